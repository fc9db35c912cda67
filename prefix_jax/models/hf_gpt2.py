"""GPT-2 weights in the HF layout (`GPT2LMHeadModel`: `transformer.h.{i}.attn.c_attn.weight`, ...)
and back. HF's GPT-2 uses `Conv1D`, whose weights are already stored (in, out) like Flax kernels.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from prefix_jax.errors import UserError
from prefix_jax.models.gpt2 import GPT2Config

# HF per-layer name -> (Flax module inside `layers`, leaf)
_LAYER_TENSORS = {
    "ln_1.weight": ("ln_1", "scale"),
    "ln_1.bias": ("ln_1", "bias"),
    "attn.c_attn.weight": ("c_attn", "kernel"),
    "attn.c_attn.bias": ("c_attn", "bias"),
    "attn.c_proj.weight": ("attn_proj", "kernel"),
    "attn.c_proj.bias": ("attn_proj", "bias"),
    "ln_2.weight": ("ln_2", "scale"),
    "ln_2.bias": ("ln_2", "bias"),
    "mlp.c_fc.weight": ("c_fc", "kernel"),
    "mlp.c_fc.bias": ("c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp_proj", "kernel"),
    "mlp.c_proj.bias": ("mlp_proj", "bias"),
}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf(hf: Mapping, dtype: str = "float32") -> GPT2Config:
    """GPT2Config from an HF `config.json` dict; refuses variants this module does not compute."""
    unsupported = {
        "activation_function": hf.get("activation_function", "gelu_new") not in _GELU_TANH,
        "scale_attn_weights": not hf.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": hf.get("add_cross_attention", False),
        "tie_word_embeddings": not hf.get("tie_word_embeddings", True),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise UserError(f"GPT-2 config sets {', '.join(f'{k}={hf.get(k)!r}' for k in bad)}, "
                        "which prefix_jax's GPT-2 does not implement; use a standard GPT-2 "
                        "checkpoint")
    d = hf["n_embd"]
    return GPT2Config(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"],
                      n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
                      max_seq_len=hf.get("n_positions", 1024),
                      ln_eps=hf.get("layer_norm_epsilon", 1e-5), dtype=dtype)


def params_from_hf(cfg: GPT2Config, tensors: Mapping[str, np.ndarray]) -> dict:
    """Flax params from HF-named tensors (with or without GPT2LMHeadModel's `transformer.`)."""
    prefix = "transformer." if "transformer.wte.weight" in tensors else ""

    def get(name: str) -> np.ndarray:
        if prefix + name not in tensors:
            raise UserError(f"model weights lack tensor '{prefix + name}': is this a GPT-2 "
                            "checkpoint? Point model.path at one.")
        return np.asarray(tensors[prefix + name], dtype=np.float32)

    layers: dict = {}
    for hf_name, (module, leaf) in _LAYER_TENSORS.items():
        stacked = np.stack([get(f"h.{i}.{hf_name}") for i in range(cfg.n_layers)])
        layers.setdefault(module, {})[leaf] = stacked
    return {"wte": {"embedding": get("wte.weight")},
            "wpe": {"embedding": get("wpe.weight")},
            "layers": layers,
            "ln_f": {"scale": get("ln_f.weight"), "bias": get("ln_f.bias")}}


def config_to_hf(cfg: GPT2Config) -> dict:
    """The HF `config.json` fields of a GPT2Config (inverse of `config_from_hf`)."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.ln_eps, "activation_function": "gelu_new",
            "tie_word_embeddings": True}


def params_to_hf(cfg: GPT2Config, params: Mapping) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel-named float32 tensors from Flax params (inverse of `params_from_hf`;
    `lm_head.weight` is left out: it is `wte`, tied)."""
    tensors = {"transformer.wte.weight": params["wte"]["embedding"],
               "transformer.wpe.weight": params["wpe"]["embedding"],
               "transformer.ln_f.weight": params["ln_f"]["scale"],
               "transformer.ln_f.bias": params["ln_f"]["bias"]}
    for hf_name, (module, leaf) in _LAYER_TENSORS.items():
        stacked = np.asarray(params["layers"][module][leaf])
        for i in range(cfg.n_layers):
            tensors[f"transformer.h.{i}.{hf_name}"] = stacked[i]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
