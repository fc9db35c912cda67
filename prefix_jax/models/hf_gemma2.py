"""Gemma 2 checkpoints in the HF layout: `config.json` read by `transformers.AutoConfig` (so
absent fields take transformers' defaults, e.g. `query_pre_attn_scalar`, the soft-caps and the
alternating `layer_types`), weights from `*.safetensors` (one file or shards listed in
`model.safetensors.index.json`; float32, float16 or bfloat16 on disk).

Nothing loads approximately: a config field this module does not compute, a missing, left-over
or misshapen tensor is refused with one line naming it. HF stores linear weights as (out, in);
Flax kernels are (in, out).
"""

from __future__ import annotations

import types
from collections.abc import Mapping

import numpy as np

from prefix_jax.errors import UserError
from prefix_jax.models.gemma2 import LAYER_TYPES, Gemma2Config

# HF per-layer name -> (Flax module inside `layers`, leaf, transpose?)
_LAYER_TENSORS = {
    "self_attn.q_proj.weight": ("q_proj", "kernel", True),
    "self_attn.k_proj.weight": ("k_proj", "kernel", True),
    "self_attn.v_proj.weight": ("v_proj", "kernel", True),
    "self_attn.o_proj.weight": ("o_proj", "kernel", True),
    "mlp.gate_proj.weight": ("gate_proj", "kernel", True),
    "mlp.up_proj.weight": ("up_proj", "kernel", True),
    "mlp.down_proj.weight": ("down_proj", "kernel", True),
    "input_layernorm.weight": ("input_layernorm", "weight", False),
    "post_attention_layernorm.weight": ("post_attention_layernorm", "weight", False),
    "pre_feedforward_layernorm.weight": ("pre_feedforward_layernorm", "weight", False),
    "post_feedforward_layernorm.weight": ("post_feedforward_layernorm", "weight", False),
}
# transformers' activation name -> exact GELU? (both tanh names are the same function)
_ACTIVATIONS = {"gelu_pytorch_tanh": False, "gelu_new": False, "gelu": True}


def _refuse(field: str, value, why: str) -> UserError:
    return UserError(f"Gemma 2 config.json sets {field}={value!r}, which prefix_jax does not "
                     f"implement ({why}); use a checkpoint without it")


def config_from_hf(hf, dtype: str = "float32") -> Gemma2Config:
    """Gemma2Config from an HF config (AutoConfig's `to_dict()`, as the loader passes it, or the
    `transformers.Gemma2Config` itself)."""
    if isinstance(hf, Mapping):
        hf = types.SimpleNamespace(**hf)  # every field is present in AutoConfig's to_dict()
    if hf.model_type != "gemma2":
        raise _refuse("model_type", hf.model_type, "this loader reads 'gemma2' only")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise _refuse("rope_parameters.rope_type", rope["rope_type"],
                      "only the default rotary embedding")
    if hf.hidden_activation not in _ACTIVATIONS:
        raise _refuse("hidden_activation", hf.hidden_activation,
                      f"only {', '.join(_ACTIVATIONS)}")
    if getattr(hf, "attention_bias", False):
        raise _refuse("attention_bias", True, "attention projections have no bias")
    if getattr(hf, "use_bidirectional_attention", None):
        raise _refuse("use_bidirectional_attention", True, "the decoder is causal")
    layer_types = tuple(hf.layer_types)
    if len(layer_types) != hf.num_hidden_layers or set(layer_types) - set(LAYER_TYPES):
        raise _refuse("layer_types", list(layer_types),
                      f"one of {LAYER_TYPES} per layer, {hf.num_hidden_layers} layers")
    if "sliding_attention" in layer_types and not hf.sliding_window:
        raise _refuse("sliding_window", hf.sliding_window,
                      "sliding_attention layers need a window")
    if hf.num_attention_heads % hf.num_key_value_heads:
        raise _refuse("num_key_value_heads", hf.num_key_value_heads,
                      f"it must divide num_attention_heads={hf.num_attention_heads}")
    return Gemma2Config(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        head_dim=hf.head_dim or hf.hidden_size // hf.num_attention_heads,
        d_ff=hf.intermediate_size,
        layer_types=layer_types,
        sliding_window=hf.sliding_window,
        query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
        attn_logit_softcap=hf.attn_logit_softcapping,
        final_logit_softcap=hf.final_logit_softcapping,
        exact_gelu=_ACTIVATIONS[hf.hidden_activation],
        rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10_000.0))),
        rms_eps=hf.rms_norm_eps,
        tie_embeddings=bool(hf.tie_word_embeddings),
        max_seq_len=hf.max_position_embeddings,
        dtype=dtype,
    )


def _expected_shapes(cfg: Gemma2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `cfg` holds, by HF name, with its HF (out, in) shape."""
    q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_model, cfg.d_ff
    per_layer = {
        "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
        **{name: (d,) for name in _LAYER_TENSORS if name.endswith("layernorm.weight")},
    }
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(cfg.n_layers):
        shapes.update({f"model.layers.{i}.{name}": s for name, s in per_layer.items()})
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def params_from_hf(cfg: Gemma2Config, tensors: Mapping[str, np.ndarray]) -> dict:
    """Flax params from HF-named tensors; every expected tensor present with its shape, none
    left over (a tied checkpoint may repeat the embedding as `lm_head.weight`)."""
    expected = _expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in tensors:
            raise UserError(f"Gemma 2 weights lack tensor '{name}': the checkpoint does not "
                            "match its config.json; point model.path at a complete checkpoint")
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"Gemma 2 tensor '{name}' has shape {tuple(tensors[name].shape)} "
                            f"but config.json implies {shape}; the weights belong to another "
                            "config")
    left_over = sorted(set(tensors) - set(expected))
    if cfg.tie_embeddings and "lm_head.weight" in left_over:
        if not np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise UserError("Gemma 2 tensor 'lm_head.weight' differs from the embedding but "
                            "config.json sets tie_word_embeddings=true; fix the config")
        left_over.remove("lm_head.weight")
    if left_over:
        raise UserError(f"Gemma 2 weights have {len(left_over)} tensor(s) this model does not "
                        f"use, e.g. '{left_over[0]}': the checkpoint is not a plain Gemma 2")

    def get(name: str) -> np.ndarray:
        return np.asarray(tensors[name], dtype=np.float32)

    layers: dict = {}
    for hf_name, (module, leaf, transpose) in _LAYER_TENSORS.items():
        stacked = [get(f"model.layers.{i}.{hf_name}") for i in range(cfg.n_layers)]
        layers[module] = {leaf: np.stack([w.T if transpose else w for w in stacked])}
    params = {
        "embed_tokens": {"embedding": get("model.embed_tokens.weight")},
        "layers": layers,
        "norm": {"weight": get("model.norm.weight")},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight").T}
    return params
