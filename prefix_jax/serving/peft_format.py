"""HF PEFT prefix-tuning adapters: our prefix `KV([L, 1, P, K, D])` <-> PEFT's files.

A PEFT prefix-tuning adapter directory holds `adapter_model.safetensors`, one tensor
`prompt_embeddings` `[P, L * 2 * K * D]`, and `adapter_config.json`. PEFT views each row as
`[2L, K, D]` and, after its permute `[2, 0, 3, 1, 4]` and split into pairs, gives layer i the key
at index 2i and the value at 2i + 1: a row is `[L, (key, value), K, D]` flattened (checked against
peft's own `get_prompt` in tests/test_peft_interop.py). An MLP-reparameterized PEFT adapter saves
the MLP's output in the same tensor, so `prefix_projection` is false in every file we write.

PEFT feeds the prefix as a cache of length P: real tokens sit at positions P, P+1, ...; an adapter
reproduces only under `prefix.positions='after_prefix'` (see positions.py).

`base_model_name_or_path` names the base portably (`base_model_name`): an HF id or a directory's
name, or a GGUF file's name, never a path that exists only on the training machine. The path the
run resolved is kept in `prefix_jax.json` beside the PEFT files (PEFT warns about unknown keys in
adapter_config.json, calling them a newer PEFT's, so they are not put there), with a README.md
model card (serving/model_card.py).
"""

from __future__ import annotations

import json
import os
import re

import ml_collections
import numpy as np

from prefix_jax import configs
from prefix_jax.errors import UserError
from prefix_jax.models.core import KV
from prefix_jax.prefix import positions
from prefix_jax.training import workdir as workdir_io

CONFIG_FILE, WEIGHTS_FILE = configs.PEFT_CONFIG_FILE, configs.PEFT_WEIGHTS_FILE
TENSOR = "prompt_embeddings"
PROVENANCE_FILE = "prefix_jax.json"  # where the adapter came from (the base's resolved path, ...)
MODEL_CARD_FILE = "README.md"
# transformers' hub cache keeps a model at .../models--ORG--NAME/snapshots/REVISION
_HUB_CACHE_DIR = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


def kv_to_embeddings(kv: KV) -> np.ndarray:
    """`KV([L, 1, P, K, D])` -> PEFT's `prompt_embeddings` `[P, L * 2 * K * D]` (float32)."""
    k, v = np.asarray(kv.k, np.float32), np.asarray(kv.v, np.float32)
    if k.ndim != 5 or k.shape[1] != 1:
        raise ValueError(f"expected one prefix KV([L, 1, P, K, D]), got {k.shape}")
    stacked = np.stack([k[:, 0], v[:, 0]], axis=1)  # [L, 2, P, K, D]
    return np.ascontiguousarray(stacked.transpose(2, 0, 1, 3, 4).reshape(k.shape[2], -1))


def embeddings_to_kv(embeddings: np.ndarray, n_layers: int, n_kv_heads: int,
                     head_dim: int) -> KV:
    """PEFT's `[P, L * 2 * K * D]` -> `KV([L, 1, P, K, D])` (inverse of `kv_to_embeddings`)."""
    p = embeddings.shape[0]
    per_row = np.asarray(embeddings, np.float32).reshape(p, n_layers, 2, n_kv_heads, head_dim)
    kv = per_row.transpose(1, 2, 0, 3, 4)  # [L, 2, P, K, D]
    return KV(kv[:, 0][:, None], kv[:, 1][:, None])


def adapter_config(model_config, length: int, base_model: str) -> dict:
    """`adapter_config.json` of a prefix-tuning adapter for a causal LM with this base config."""
    token_dim = model_config.n_kv_heads * model_config.head_dim
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": length,
        "num_layers": model_config.n_layers,
        "num_attention_heads": model_config.n_kv_heads,  # PEFT's per-KV-head view of token_dim
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": token_dim,
        "prefix_projection": False,  # the MLP's output is what is saved, as PEFT does
        "inference_mode": True,
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }


def base_model_name(model_path: str, source: str) -> str:
    """The base's portable name for `base_model_name_or_path`: the HF id of a hub-cache snapshot
    directory, else a directory's or a .gguf file's own name; `model.path` itself for names
    that are no path (`tiny`). `source` is what `model.path` resolved to (LoadedModel.source)."""
    hub = _HUB_CACHE_DIR.search(source)
    if hub:
        return f"{hub.group(1)}/{hub.group(2)}"
    if os.path.isdir(source) or (source.endswith(".gguf") and os.path.isfile(source)):
        return os.path.basename(os.path.normpath(source))
    return model_path


def write_adapter(out_dir: str, kv: KV, model_config, base_model: str,
                  provenance: dict | None = None, model_card: str | None = None) -> None:
    """Write `kv` as a PEFT adapter into `out_dir` (created; must not hold files already), with
    `provenance` as prefix_jax.json and `model_card` as README.md when given. The directory
    appears complete or not at all (training/workdir.py `new_directory`)."""
    from safetensors.numpy import save

    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"--out={out_dir} exists and is not empty; give a new directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out={out_dir} is a file; give a new directory")
    embeddings = kv_to_embeddings(kv)
    config = adapter_config(model_config, embeddings.shape[0], base_model)
    with workdir_io.new_directory(out_dir) as staging:
        workdir_io.write_bytes(staging, WEIGHTS_FILE, save({TENSOR: embeddings}))
        workdir_io.write_text(staging, CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True)
                              + "\n")
        if provenance is not None:
            workdir_io.write_text(staging, PROVENANCE_FILE,
                                  json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        if model_card is not None:
            workdir_io.write_text(staging, MODEL_CARD_FILE, model_card)


def read_adapter(path: str) -> tuple[dict, np.ndarray]:
    """The adapter config and `prompt_embeddings` of a PEFT prefix-tuning adapter directory."""
    from safetensors.numpy import load_file

    config_path = os.path.join(path, CONFIG_FILE)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    where = f"prefix.init_from_peft={path}"
    try:
        with open(config_path) as f:
            config = json.load(f)
        tensors = load_file(weights_path)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, ValueError) as e:
        raise UserError(f"{where}: unreadable adapter files ({e}); re-export the adapter") from e
    if config.get("peft_type") != "PREFIX_TUNING":
        raise UserError(f"{where} is a {config.get('peft_type')!r} adapter; only PEFT "
                        "PREFIX_TUNING adapters hold a prefix")
    if TENSOR not in tensors:
        raise UserError(f"{where}: {WEIGHTS_FILE} has no '{TENSOR}' tensor (found "
                        f"{sorted(tensors)}); save the adapter with a current peft")
    return config, tensors[TENSOR]


def load_prefix(prefix_cfg: ml_collections.ConfigDict, model_config) -> KV:
    """The prefix `KV([L, 1, P, K, D])` of the adapter at `prefix_cfg.init_from_peft`, checked
    against the base model and the prefix config (one UserError naming the mismatch)."""
    configs.check_peft_adapter(prefix_cfg)
    path = prefix_cfg.init_from_peft
    config, embeddings = read_adapter(path)
    where = f"prefix.init_from_peft={path}"
    mode, reparam = prefix_cfg.mode, prefix_cfg.get("reparam", "none")
    if mode != "kv" or reparam != "none":
        raise UserError(f"{where} needs prefix.mode='kv' and no reparameterization (got "
                        f"mode={mode!r}, reparam={reparam!r}): a PEFT adapter is free keys "
                        "and values")
    if positions.resolve(prefix_cfg.positions, model_config) != "after_prefix":
        raise UserError(f"{where} with prefix.positions={prefix_cfg.positions!r}: PEFT numbers "
                        "real tokens from P; set prefix.positions=after_prefix")
    layers, heads, head_dim = model_config.n_layers, model_config.n_kv_heads, model_config.head_dim
    want = (prefix_cfg.length, layers * 2 * heads * head_dim)
    if embeddings.ndim != 2 or embeddings.shape != want or \
            config.get("num_layers", layers) != layers or \
            config.get("token_dim", heads * head_dim) != heads * head_dim:
        raise UserError(
            f"{where} holds a prefix of shape {list(embeddings.shape)} (num_layers="
            f"{config.get('num_layers')}, token_dim={config.get('token_dim')}) but this model "
            f"and prefix.length={prefix_cfg.length} need {list(want)} ({layers} layers x 2 x "
            f"{heads} KV heads x {head_dim}); use an adapter of this base model and set "
            f"prefix.length={config.get('num_virtual_tokens', embeddings.shape[0])}")
    return embeddings_to_kv(embeddings, layers, heads, head_dim)


def prefix_params(prefix_cfg: ml_collections.ConfigDict, model_config, fresh: dict) -> dict:
    """`prefix.init_from_peft`: the prefix parameters `fresh` (a KVPrefix's `key`/`value`
    `[L, P, K, D]`, as `prefix.init` made them) replaced by the adapter's."""
    flat_kv_everywhere = (prefix_cfg.mode == "kv" and prefix_cfg.get("reparam", "none") == "none"
                          and prefix_cfg.get("layers", "all") == "all")
    if set(fresh) != {"key", "value"} or not flat_kv_everywhere:
        raise UserError(f"prefix.init_from_peft loads one kv prefix at every layer, but this "
                        f"config's prefix has parameters {sorted(fresh)} (multi-task or another "
                        "layout); use prefix.mode='kv', reparam='none', layers='all' and one task")
    kv = load_prefix(prefix_cfg, model_config)
    return {"key": kv.k[:, 0].astype(fresh["key"].dtype),
            "value": kv.v[:, 0].astype(fresh["value"].dtype)}
