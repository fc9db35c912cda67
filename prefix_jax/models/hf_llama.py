"""Llama weights in the HF layout: `config.json` + `*.safetensors`, and the name mapping that the
GGUF loader reuses. HF stores linear weights as (out, in); Flax kernels are (in, out)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from prefix_jax.errors import UserError
from prefix_jax.models.llama import LlamaConfig

# HF per-layer name -> (Flax module path inside `layers`, transpose?)
_LAYER_TENSORS = {
    "self_attn.q_proj.weight": ("q_proj", "kernel", True),
    "self_attn.k_proj.weight": ("k_proj", "kernel", True),
    "self_attn.v_proj.weight": ("v_proj", "kernel", True),
    "self_attn.o_proj.weight": ("o_proj", "kernel", True),
    "mlp.gate_proj.weight": ("gate_proj", "kernel", True),
    "mlp.up_proj.weight": ("up_proj", "kernel", True),
    "mlp.down_proj.weight": ("down_proj", "kernel", True),
    "input_layernorm.weight": ("input_layernorm", "scale", False),
    "post_attention_layernorm.weight": ("post_attention_layernorm", "scale", False),
}


def config_from_hf(hf: Mapping, dtype: str = "float32") -> LlamaConfig:
    """LlamaConfig from an HF `config.json` dict (LlamaForCausalLM and compatible)."""
    n_heads = hf["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_ff=hf["intermediate_size"],
        rope_theta=float((hf.get("rope_parameters") or {}).get("rope_theta")
                         or hf.get("rope_theta", 10_000.0)),
        rms_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        dtype=dtype,
    )


def params_from_hf(cfg: LlamaConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """Flax params (`{"embed_tokens":..., "layers":..., "norm":...}`) from HF-named tensors."""

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise UserError(f"model weights lack tensor '{name}': is this a Llama-family "
                            "checkpoint? Point model.path at one.")
        return np.asarray(tensors[name], dtype=np.float32)

    layers: dict = {}
    for hf_name, (module, leaf, transpose) in _LAYER_TENSORS.items():
        stacked = [get(f"model.layers.{i}.{hf_name}") for i in range(cfg.n_layers)]
        stacked = np.stack([w.T if transpose else w for w in stacked])
        layers[module] = {leaf: stacked}
    params = {
        "embed_tokens": {"embedding": get("model.embed_tokens.weight")},
        "layers": layers,
        "norm": {"scale": get("model.norm.weight")},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight").T}
    return params


def read_hf_dir(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """`config.json` as a dict and every `*.safetensors` tensor of an HF model directory."""
    from safetensors.numpy import load_file

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"model.path={path} has no config.json: give an HF model directory "
                        "(config.json + *.safetensors), a .gguf file, 'smollm2' or 'tiny'")
    with open(config_path) as f:
        hf_config = json.load(f)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise UserError(f"model.path={path} has no *.safetensors files: convert the checkpoint "
                        "to safetensors (pickled .bin weights are not loaded)")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(load_file(os.path.join(path, name)))
    return hf_config, tensors


def load_hf_dir(path: str, dtype: str = "float32") -> tuple[LlamaConfig, dict]:
    """Config and params from a directory with `config.json` and `*.safetensors`."""
    hf_config, tensors = read_hf_dir(path)
    cfg = config_from_hf(hf_config, dtype)
    return cfg, params_from_hf(cfg, tensors)


def config_to_hf(cfg: LlamaConfig) -> dict:
    """The HF `config.json` fields of a LlamaConfig (inverse of `config_from_hf`)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.d_ff, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.rms_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False}


def params_to_hf(cfg: LlamaConfig, params: Mapping) -> dict[str, np.ndarray]:
    """HF-named float32 tensors from Flax params (inverse of `params_from_hf`)."""
    tensors = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"]),
               "model.norm.weight": np.asarray(params["norm"]["scale"])}
    for hf_name, (module, leaf, transpose) in _LAYER_TENSORS.items():
        stacked = np.asarray(params["layers"][module][leaf])
        for i in range(cfg.n_layers):
            tensors[f"model.layers.{i}.{hf_name}"] = stacked[i].T if transpose else stacked[i]
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
