"""A Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) whose attention takes
a per-layer prefix of keys and values.

Layers are stacked with `nn.scan`, so every per-layer parameter has a leading `layers` axis (one
compile of one layer instead of thirty) and a prefix is one array `[L, B, P, n_kv_heads, head_dim]`.

Two ways to call the model, one code path:
- no cache: keys/values are `concat(prefix, this sequence)`; the mask is `[B, T, P + T]`.
- with a cache `[L, B, S, K, D]` (decoding): this call's keys/values are written at `cache_index`
  and the queries attend over the whole cache; the mask is `[B, T, S]`. The prefix lives in the
  cache's first slots, written once by the decoder, so it is not passed again. A
  `core.SplitCache` (decoding steps: prefix and prompt once per prompt, generated slots per
  hypothesis) is read, not rewritten: the call returns only its own tokens' K/V.

The HF Llama-family variants are fields of `LlamaConfig` (hf_llama.py maps each `model_type`):
Llama 3.x `llama3` RoPE scaling, q/k/v (and o) biases (Qwen2, Llama/Qwen3 `attention_bias`),
RMSNorms of each query/key head before RoPE (Qwen3), and a sliding attention window in every
layer (Mistral; see `core.sliding_window` and docs/models.md for how it meets a prefix).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from prefix_jax.models.backbone import Capabilities
from prefix_jax.models.core import (
    KV,
    REMAT_POLICIES,
    apply_rope,
    cached_attention,
    n_cache_slots,
    rms_norm,
    rope_angles,
    rope_inv_freq,
    shard_rows,
    sliding_window,
    with_layer_keys,
)
from prefix_jax.models.int8 import KERNEL_SCALE, Int8Dense

# Logical names of every parameter's dimensions, by path regex (for `sharding.regex_axes`):
# `config.mesh.rules` maps them to mesh axes (FSDP over `embed`, tensor parallel over heads/mlp).
LOGICAL_AXES = (
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"layers/q_proj/kernel$", ("layers", "embed", "heads")),
    (r"layers/(k_proj|v_proj)/kernel$", ("layers", "embed", "kv_heads")),
    (r"layers/o_proj/kernel$", ("layers", "heads", "embed")),
    (r"layers/(gate_proj|up_proj)/kernel$", ("layers", "embed", "mlp")),
    (r"layers/down_proj/kernel$", ("layers", "mlp", "embed")),
    (r"layers/\w+_layernorm/scale$", ("layers", "embed")),
    (r"layers/q_proj/bias$", ("layers", "heads")),
    (r"layers/(k_proj|v_proj)/bias$", ("layers", "kv_heads")),
    (r"layers/o_proj/bias$", ("layers", "embed")),
    (r"layers/(q_norm|k_norm)/scale$", ("layers", None)),
    (r"(^|/)norm/scale$", ("embed",)),
    (r"lm_head/kernel$", ("embed", "vocab")),
    # int8 bases (models/int8.py): one scale per output channel, sharded like that channel
    (rf"layers/q_proj/{KERNEL_SCALE}$", ("layers", "heads")),
    (rf"layers/(k_proj|v_proj)/{KERNEL_SCALE}$", ("layers", "kv_heads")),
    (rf"layers/(o_proj|down_proj)/{KERNEL_SCALE}$", ("layers", "embed")),
    (rf"layers/(gate_proj|up_proj)/{KERNEL_SCALE}$", ("layers", "mlp")),
    (rf"lm_head/{KERNEL_SCALE}$", ("vocab",)),
)


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.x RoPE (`rope_type: llama3`): low frequencies divided by `factor`, high ones kept,
    a smooth blend between (transformers' `_compute_llama3_parameters`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def inv_freq(self, head_dim: int, theta: float) -> jax.Array:
        """The scaled inverse frequencies `[head_dim / 2]`, float32 as transformers computes
        them (same operations in the same order)."""
        inv_freq = rope_inv_freq(head_dim, theta)
        old_context = self.original_max_position_embeddings
        low_freq_wavelen = old_context / self.low_freq_factor
        high_freq_wavelen = old_context / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = ((old_context / wavelen - self.low_freq_factor)
                  / (self.high_freq_factor - self.low_freq_factor))
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return jnp.where(is_medium, smoothed, scaled)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10_000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    dtype: str = "float32"  # compute dtype of activations; parameters keep their own
    # The HF family variant (defaults: a plain Llama, as GGUF files and tiny models are).
    model_type: str = "llama"  # HF model_type: 'llama', 'qwen2', 'qwen3' or 'mistral'
    rope_scaling: Llama3RopeScaling | None = None  # None: standard RoPE of `rope_theta`
    qkv_bias: bool = False  # q/k/v projections have biases (Qwen2; attention_bias)
    o_bias: bool = False  # the output projection has a bias (attention_bias of Llama/Qwen3)
    qk_norm: bool = False  # RMSNorm over each query/key head before RoPE (Qwen3)
    sliding_window: int | None = None  # each query sees keys < this many positions back
    int8: bool = False  # dense kernels stored int8 + per-channel scales (models/int8.py)

    name: ClassVar[str] = "Llama-family"
    logical_axes: ClassVar[tuple] = LOGICAL_AXES

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None")

    @property
    def capabilities(self) -> Capabilities:
        """`kv` and `input` for every variant (`input` runs the model itself on trainable
        embeddings). `hidden` projects prefix states through the norm and K/V kernels alone,
        with standard RoPE (prefix._project_hidden), so only variants without biases, q/k norms
        or scaled RoPE compute it exactly, and only on float kernels (not an int8 base)."""
        plain = not (self.qkv_bias or self.qk_norm or self.rope_scaling is not None
                     or self.int8)
        modes = ("kv", "hidden", "input") if plain else ("kv", "input")
        return Capabilities(kind="decoder", positions="rotary", prefix_modes=modes)

    def inv_freq(self) -> jax.Array | None:
        """RoPE inverse frequencies when they are not the standard ones of `rope_theta`."""
        if self.rope_scaling is None:
            return None
        return self.rope_scaling.inv_freq(self.head_dim, self.rope_theta)


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.param("scale", nn.initializers.ones, (x.shape[-1],)), self.eps)


def _dense(cfg: LlamaConfig, features: int, name: str, use_bias: bool = False
           ) -> nn.Dense | Int8Dense:
    dtype = jnp.dtype(cfg.dtype)
    if cfg.int8:
        return Int8Dense(features, dtype=dtype, use_bias=use_bias, name=name)
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=nn.initializers.lecun_normal())


class DecoderLayer(nn.Module):
    """One pre-norm block. Scanned over layers: (x, per-layer inputs) -> (x, this layer's K/V)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, prefix: KV | None, cache: KV | None, cache_index,
                 key_mask: jax.Array | None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, t, _ = x.shape
        x = shard_rows(x)  # the scan carry: keep rows split over the batch mesh axes
        self.sow("intermediates", "layer_input", x)
        mask = with_layer_keys(mask, key_mask)
        h = RMSNorm(cfg.rms_eps, name="input_layernorm")(x)
        q = _dense(cfg, cfg.n_heads * cfg.head_dim, "q_proj", cfg.qkv_bias)(h).reshape(
            b, t, cfg.n_heads, -1)
        k = _dense(cfg, cfg.n_kv_heads * cfg.head_dim, "k_proj", cfg.qkv_bias)(h).reshape(
            b, t, cfg.n_kv_heads, -1)
        v = _dense(cfg, cfg.n_kv_heads * cfg.head_dim, "v_proj", cfg.qkv_bias)(h).reshape(
            b, t, cfg.n_kv_heads, -1)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_eps, name="q_norm")(q)
            k = RMSNorm(cfg.rms_eps, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        attn, new_kv = cached_attention(q, k, v, prefix, cache, cache_index, mask, dtype)
        x = x + _dense(cfg, cfg.d_model, "o_proj", cfg.o_bias)(attn).astype(x.dtype)

        h = RMSNorm(cfg.rms_eps, name="post_attention_layernorm")(x)
        gate = _dense(cfg, cfg.d_ff, "gate_proj")(h)
        up = _dense(cfg, cfg.d_ff, "up_proj")(h)
        x = x + _dense(cfg, cfg.d_model, "down_proj")(nn.silu(gate) * up).astype(x.dtype)
        return x, new_kv


class Llama(nn.Module):
    """Decoder-only LM. Parameter names follow HF (`embed_tokens`, `layers/q_proj`, `norm`, ...).

    `remat` (a key of REMAT_POLICIES) trades compute for activation memory on long sequences.
    `unroll` layers go into each scan iteration; `n_layers` unrolls the stack completely (a
    slower compile; XLA's cost analysis counts a loop body once, so FLOP counts need it).
    """

    config: LlamaConfig
    remat: str = "none"
    unroll: int = 1

    def setup(self):
        cfg = self.config
        layer = DecoderLayer
        if self.remat != "none":
            # prevent_cse=False is safe (and faster) under scan, as the JAX docs note.
            layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.d_model,
                                     embedding_init=nn.initializers.normal(0.125))
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast, 0),
            length=cfg.n_layers,
            unroll=self.unroll,
        )(cfg)
        self.norm = RMSNorm(cfg.rms_eps)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg, cfg.vocab_size, "lm_head")

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        prefix: KV | None = None,
        cache: KV | None = None,
        cache_index: jax.Array | int = 0,
        return_hidden: bool = False,
        key_mask: jax.Array | None = None,
        embeddings: jax.Array | None = None,
    ) -> tuple[jax.Array, KV]:
        """tokens, positions `[B, T]`; mask `[B, T, S]`.

        `key_mask` `[L, S]` (optional) further masks key slots per layer: a prefix that acts in
        some layers only keeps its slots everywhere and hides them where it is off.
        `embeddings` `[B, T, d]` (optional) replace the token embeddings (prompt tuning runs
        trainable input embeddings through the model; `tokens` then only gives the shape).
        Layer inputs are sown as `intermediates/layers/layer_input` `[L, B, T, d]`.

        Returns (logits `[B, T, V]`, or the final normed hidden states `[B, T, d]` when
        `return_hidden`, for callers that need logits at a few positions only) and the per-layer
        K/V: the updated cache when one is given, else this sequence's own keys and values.
        """
        cfg = self.config
        b, t = tokens.shape
        n_prefix = 0 if prefix is None else prefix.k.shape[2]
        n_keys = n_cache_slots(cache) if cache is not None else n_prefix + t
        chex.assert_shape(positions, (b, t))
        chex.assert_shape(mask, (b, t, n_keys))
        if prefix is not None:
            if cache is not None:
                raise ValueError("with a cache the prefix is already in its first slots")
            chex.assert_shape([prefix.k, prefix.v],
                              (cfg.n_layers, None, None, cfg.n_kv_heads, cfg.head_dim))

        if key_mask is not None:
            chex.assert_shape(key_mask, (cfg.n_layers, n_keys))
        if embeddings is None:
            x = self.embed_tokens(tokens)
        else:
            chex.assert_shape(embeddings, (b, t, cfg.d_model))
            x = embeddings
        x = shard_rows(x.astype(jnp.dtype(cfg.dtype)))
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.inv_freq())
        if cfg.sliding_window is not None:
            mask = sliding_window(mask, cfg.sliding_window)
        x, kv = self.layers(x, cos, sin, mask, prefix, cache, cache_index, key_mask)
        x = self.norm(x)
        if return_hidden:
            return x, kv
        return self.logits(x), kv

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits for final hidden states `[..., d]`."""
        if self.config.tie_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

