"""Llama-family weights in the HF layout (`config.json` + `*.safetensors`): Llama (incl. Llama 3.x
`llama3` RoPE scaling), Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorms), Mistral (sliding window);
the name mapping the GGUF loader reuses; and the inverse mapping that hands our weights to
transformers. HF stores linear weights as (out, in); Flax kernels are (in, out).

`config_from_hf` reads the config as transformers runs it (`hf_checkpoint.read_config`, i.e.
AutoConfig, passed here as its `to_dict()`), and refuses, with one line naming the field, every
setting the Flax model does not compute exactly. `params_from_hf` takes each tensor by name and
expected shape and refuses a missing, misshapen or left-over tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from prefix_jax.errors import UserError
from prefix_jax.models.hf_checkpoint import Tensors
from prefix_jax.models.llama import Llama3RopeScaling, LlamaConfig

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}
_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor",
                  "original_max_position_embeddings")

# HF per-layer name -> (Flax module inside `layers`, leaf, transpose?)
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
_QKV_BIASES = {
    "self_attn.q_proj.bias": ("q_proj", "bias", False),
    "self_attn.k_proj.bias": ("k_proj", "bias", False),
    "self_attn.v_proj.bias": ("v_proj", "bias", False),
}
_O_BIAS = {"self_attn.o_proj.bias": ("o_proj", "bias", False)}
_QK_NORMS = {
    "self_attn.q_norm.weight": ("q_norm", "scale", False),
    "self_attn.k_norm.weight": ("k_norm", "scale", False),
}


def _refuse(model_type: str, field: str, value, supported: str) -> UserError:
    return UserError(f"config.json of this {model_type} model sets {field}={value!r}, which "
                     f"prefix_jax does not compute exactly; supported: {supported}")


def _rope(hf: Mapping, model_type: str) -> tuple[float, Llama3RopeScaling | None]:
    """(rope_theta, llama3 scaling or None) from `rope_parameters` (transformers >= 5) or the
    older `rope_theta` + `rope_scaling` fields."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10_000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise _refuse(model_type, "partial_rotary_factor", partial, "1.0 (RoPE on every dim)")
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        missing = [f for f in _LLAMA3_FIELDS if params.get(f) is None]
        if missing:
            raise UserError(f"config.json sets rope_type='llama3' without {missing[0]}: the "
                            "llama3 RoPE needs " + ", ".join(_LLAMA3_FIELDS))
        return theta, Llama3RopeScaling(
            factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    raise _refuse(model_type, "rope_type", rope_type, "rope_type 'default' or 'llama3'")


def _sliding_window(hf: Mapping, model_type: str) -> int | None:
    """Mistral's window (every layer); Qwen2/Qwen3 windows (some layers only) are refused."""
    if model_type == "mistral":
        return hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3"):
        layer_types = hf.get("layer_types") or ()
        if hf.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise _refuse(model_type, "use_sliding_window", hf.get("use_sliding_window"),
                          "use_sliding_window=false (full attention in every layer)")
    return None


def config_from_hf(hf: Mapping, dtype: str = "float32") -> LlamaConfig:
    """LlamaConfig from an HF config dict (AutoConfig's `to_dict()`) of a supported model_type."""
    model_type = hf.get("model_type") or "llama"
    if model_type not in MODEL_TYPES:
        raise UserError(f"config.json has model_type={model_type!r}, which has no loader in "
                        f"prefix_jax; Llama-family model types: {', '.join(MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(model_type, "hidden_act", hf.get("hidden_act"), "'silu' (SwiGLU)")
    if hf.get("mlp_bias"):
        raise _refuse(model_type, "mlp_bias", hf.get("mlp_bias"), "mlp_bias=false")
    theta, scaling = _rope(hf, model_type)
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias = {"qwen2": True, "mistral": False}.get(model_type, attention_bias)
    o_bias = attention_bias if model_type in ("llama", "qwen3") else False
    n_heads = hf["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_ff=hf["intermediate_size"],
        rope_theta=theta,
        rms_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        dtype=dtype,
        model_type=model_type,
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=model_type == "qwen3",
        sliding_window=_sliding_window(hf, model_type),
    )


def _layer_tensors(cfg: LlamaConfig) -> dict[str, tuple[str, str, bool, tuple[int, ...]]]:
    """HF per-layer name -> (Flax module, leaf, transpose?, HF shape) for this config."""
    q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_model, cfg.d_ff
    shapes = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
              "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
              "input_layernorm": (d,), "post_attention_layernorm": (d,),
              "q_norm": (cfg.head_dim,), "k_norm": (cfg.head_dim,)}
    table = dict(_LAYER_TENSORS)
    if cfg.qkv_bias:
        table.update(_QKV_BIASES)
    if cfg.o_bias:
        table.update(_O_BIAS)
    if cfg.qk_norm:
        table.update(_QK_NORMS)
    return {name: (module, leaf, transpose, shapes[module][:1] if leaf == "bias"
                   else shapes[module])
            for name, (module, leaf, transpose) in table.items()}


def params_from_hf(cfg: LlamaConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """Flax params (`{"embed_tokens":..., "layers":..., "norm":...}`) from HF-named tensors;
    a missing, misshapen or unused tensor is refused."""
    source = Tensors(tensors, f"{cfg.model_type} ({cfg.name})")
    layers: dict = {}
    for hf_name, (module, leaf, transpose, shape) in _layer_tensors(cfg).items():
        stacked = [source.take(f"model.layers.{i}.{hf_name}", shape) for i in range(cfg.n_layers)]
        layers.setdefault(module, {})[leaf] = np.stack([w.T if transpose else w for w in stacked])
    embedding = source.take("model.embed_tokens.weight", (cfg.vocab_size, cfg.d_model))
    params = {
        "embed_tokens": {"embedding": embedding},
        "layers": layers,
        "norm": {"scale": source.take("model.norm.weight", (cfg.d_model,))},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": source.take("lm_head.weight",
                                                   (cfg.vocab_size, cfg.d_model)).T}
    elif "lm_head.weight" in source and not np.array_equal(  # some exporters write it out
            source.take("lm_head.weight", embedding.shape), embedding):
        raise UserError("config.json sets tie_word_embeddings=true but lm_head.weight differs "
                        "from model.embed_tokens.weight: set tie_word_embeddings=false")
    source.check_all_taken()
    return params


def config_to_hf(cfg: LlamaConfig) -> dict:
    """The HF `config.json` fields of a LlamaConfig (inverse of `config_from_hf`; build the
    transformers config with `AutoConfig.for_model(**config_to_hf(cfg))`)."""
    fields = {"architectures": [_ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
              "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
              "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
              "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
              "intermediate_size": cfg.d_ff, "rope_theta": cfg.rope_theta,
              "rms_norm_eps": cfg.rms_eps, "tie_word_embeddings": cfg.tie_embeddings,
              "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu"}
    if cfg.model_type == "llama":
        fields.update(attention_bias=cfg.o_bias, mlp_bias=False)
    elif cfg.model_type == "qwen3":
        fields.update(attention_bias=cfg.o_bias, use_sliding_window=False)
    elif cfg.model_type == "qwen2":
        fields.update(use_sliding_window=False)
    else:
        fields.update(sliding_window=cfg.sliding_window)
    if cfg.rope_scaling is not None:
        fields["rope_scaling"] = {"rope_type": "llama3", "rope_theta": cfg.rope_theta,
                                  **cfg.rope_scaling.as_dict()}
    return fields


def params_to_hf(cfg: LlamaConfig, params: Mapping) -> dict[str, np.ndarray]:
    """HF-named float32 tensors from Flax params (inverse of `params_from_hf`)."""
    tensors = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"]),
               "model.norm.weight": np.asarray(params["norm"]["scale"])}
    for hf_name, (module, leaf, transpose, _) in _layer_tensors(cfg).items():
        stacked = np.asarray(params["layers"][module][leaf])
        for i in range(cfg.n_layers):
            tensors[f"model.layers.{i}.{hf_name}"] = stacked[i].T if transpose else stacked[i]
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
