"""Tiny random backbones and the byte-level tokenizer they share, for tests and smoke runs.

`tiny` (a GQA Llama), `tiny-mha` (plain multi-head Llama), `tiny-gpt2` and `tiny-bert`: two
layers, d=64, random weights from the seed, a 259-token byte-level tokenizer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from prefix_jax.models import bert
from prefix_jax.models.core import causal_mask
from prefix_jax.models.gpt2 import GPT2, GPT2Config
from prefix_jax.models.llama import Llama, LlamaConfig

TINY_CONFIGS = {
    "tiny": dict(n_heads=4, n_kv_heads=2),
    "tiny-mha": dict(n_heads=4, n_kv_heads=4),
}
DECODER_NAMES = (*TINY_CONFIGS, "tiny-gpt2")


@functools.lru_cache(maxsize=1)
def byte_tokenizer():
    """A 259-token byte-level tokenizer (no merges) with SmolLM2's special tokens, in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # the set comes unordered
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[1],
                                   eos_token=specials[2], pad_token=specials[2],
                                   additional_special_tokens=specials)


def tiny_config(name: str = "tiny", dtype: str = "float32", **overrides) -> LlamaConfig:
    fields = dict(vocab_size=len(byte_tokenizer()), d_model=64, n_layers=2, head_dim=16, d_ff=128,
                  rope_theta=10_000.0, tie_embeddings=True, max_seq_len=1024, dtype=dtype)
    fields.update(TINY_CONFIGS[name])
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_gpt2_config(dtype: str = "float32") -> GPT2Config:
    return GPT2Config(vocab_size=len(byte_tokenizer()), d_model=64, n_layers=2, n_heads=4,
                      d_ff=256, max_seq_len=512, dtype=dtype)


def tiny_bert_config(dtype: str = "float32", **head) -> bert.BertConfig:
    """`head`: the classification head's `num_labels`, `pooling`, `classifier_dropout`."""
    return bert.BertConfig(vocab_size=len(byte_tokenizer()), d_model=64, n_layers=2, n_heads=4,
                           head_dim=16, d_ff=128, dtype=dtype, **head)


def init_params(module: Llama | GPT2, rng: jax.Array) -> dict:
    """Random params for a decoder `module` (the shapes do not depend on the dummy input's
    length)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(module.init)  # one compiled program instead of hundreds of eager ops
    return init(rng, tokens, tokens, causal_mask(jnp.ones_like(tokens), 0))["params"]


def decoder(name: str, dtype: str) -> tuple[LlamaConfig | GPT2Config, Llama | GPT2]:
    """Config and module of the tiny decoder `name` (one of DECODER_NAMES)."""
    if name == "tiny-gpt2":
        cfg = tiny_gpt2_config(dtype)
        return cfg, GPT2(cfg)
    cfg = tiny_config(name, dtype)
    return cfg, Llama(cfg)


@functools.lru_cache(maxsize=8)
def decoder_params(name: str, dtype: str, seed: int) -> dict:
    """A tiny decoder's random params as read-only host numpy arrays (the same numpy arrays as a
    loaded file, placed the same way); cached, since tests load them many times."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        params = jax.tree.map(np.asarray, init_params(decoder(name, dtype)[1],
                                                      jax.random.key(seed)))
    for leaf in jax.tree.leaves(params):
        leaf.flags.writeable = False
    return params


def bert_params(cfg: bert.BertConfig, seed: int) -> dict:
    """Random params of a tiny BERT, its classification head included, as host numpy arrays."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return jax.tree.map(np.asarray, bert.init_params(bert.Bert(cfg), jax.random.key(seed)))
