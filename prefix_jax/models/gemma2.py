"""A Gemma 2 decoder whose attention takes a per-layer prefix of keys and values.

What sets it apart from the Llama family (models/llama.py), each as transformers computes it:
- RMSNorm multiplies by `1 + weight` (the checkpoints store the offset), and every layer has
  four norms: before and after attention, before and after the MLP (the "sandwich");
- token embeddings are multiplied by `sqrt(d_model)` rounded to the activation dtype (tied to
  the output head, which is not scaled);
- GeGLU MLP (tanh-approximated GELU on the gate);
- attention scores are scaled by `query_pre_attn_scalar ** -0.5`, not `head_dim ** -0.5`, and
  soft-capped (`c * tanh(s / c)`), as are the final logits;
- `layer_types` alternates sliding-window ('sliding_attention', layer 0 first) and global
  layers; `head_dim` is its own field, independent of `d_model / n_heads`.

Sliding window with a prefix: a sliding layer's query sees the keys fewer than `sliding_window`
positions back, itself included (`core.sliding_window`), where prefix slot j of P sits at
`first_real_position - P + j`. That is where transformers puts a P-slot `past_key_values`
cache, so with `prefix.positions=after_prefix` the prefix is cache positions 0..P-1 and drops
out of the window once a query is `sliding_window - P + j` tokens in, in training and decoding
alike. Distances count the keys a row may see, so left padding (decoding) and packing
(training) do not shift the window.

Call it like Llama (one code path, with or without a cache; layers stacked with `nn.scan`).
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
    sliding_window,
    with_layer_keys,
)

LAYER_TYPES = ("sliding_attention", "full_attention")

# Logical names of every parameter's dimensions, by path regex (for `sharding.regex_axes`).
LOGICAL_AXES = (
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"layers/q_proj/kernel$", ("layers", "embed", "heads")),
    (r"layers/(k_proj|v_proj)/kernel$", ("layers", "embed", "kv_heads")),
    (r"layers/o_proj/kernel$", ("layers", "heads", "embed")),
    (r"layers/(gate_proj|up_proj)/kernel$", ("layers", "embed", "mlp")),
    (r"layers/down_proj/kernel$", ("layers", "mlp", "embed")),
    (r"layers/\w+_layernorm/weight$", ("layers", "embed")),
    (r"(^|/)norm/weight$", ("embed",)),
    (r"lm_head/kernel$", ("embed", "vocab")),
)


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    layer_types: tuple[str, ...]  # one of LAYER_TYPES per layer
    sliding_window: int | None  # keys a sliding layer's query sees, itself included
    query_pre_attn_scalar: float = 256.0  # attention scores are scaled by its -0.5 power
    attn_logit_softcap: float | None = 50.0  # None: no capping of attention scores
    final_logit_softcap: float | None = 30.0  # None: no capping of the output logits
    exact_gelu: bool = False  # False: the tanh approximation (`gelu_pytorch_tanh`)
    rope_theta: float = 10_000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = True
    max_seq_len: int = 8192
    dtype: str = "float32"  # compute dtype of activations; parameters keep their own

    name: ClassVar[str] = "Gemma 2"
    # `hidden` would project through norms that Gemma scales by 1 + weight, and `input` would
    # have to undo the embedding scale: neither is implemented, so only `kv`.
    capabilities: ClassVar[Capabilities] = Capabilities(
        kind="decoder", positions="rotary", prefix_modes=("kv",))
    logical_axes: ClassVar[tuple] = LOGICAL_AXES

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        if len(self.layer_types) != self.n_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ValueError(f"layer_types={self.layer_types} must give one of {LAYER_TYPES} "
                             f"for each of the {self.n_layers} layers")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")


class OffsetRMSNorm(nn.Module):
    """RMSNorm scaled by `1 + weight` (in float32), as Gemma checkpoints store it."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.zeros, (x.shape[-1],))
        return rms_norm(x, 1.0 + weight.astype(jnp.float32), self.eps)


def _dense(features: int, name: str, dtype) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, name=name,
                    kernel_init=nn.initializers.lecun_normal())


class DecoderLayer(nn.Module):
    """One sandwich-norm block. Scanned over layers: (x, per-layer inputs) -> (x, its K/V)."""

    config: Gemma2Config

    @nn.compact
    def __call__(self, x, cos, sin, mask, window_mask, is_sliding, prefix: KV | None,
                 cache: KV | None, cache_index, key_mask: jax.Array | None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, t, _ = x.shape
        self.sow("intermediates", "layer_input", x)
        mask = with_layer_keys(jnp.where(is_sliding, window_mask, mask), key_mask)
        h = OffsetRMSNorm(cfg.rms_eps, name="input_layernorm")(x)
        q = _dense(cfg.n_heads * cfg.head_dim, "q_proj", dtype)(h).reshape(b, t, cfg.n_heads, -1)
        k = _dense(cfg.n_kv_heads * cfg.head_dim, "k_proj", dtype)(h).reshape(
            b, t, cfg.n_kv_heads, -1)
        v = _dense(cfg.n_kv_heads * cfg.head_dim, "v_proj", dtype)(h).reshape(
            b, t, cfg.n_kv_heads, -1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        attn, new_kv = cached_attention(q, k, v, prefix, cache, cache_index, mask, dtype,
                                        scale=cfg.query_pre_attn_scalar ** -0.5,
                                        softcap=cfg.attn_logit_softcap)
        attn = _dense(cfg.d_model, "o_proj", dtype)(attn)
        x = x + OffsetRMSNorm(cfg.rms_eps, name="post_attention_layernorm")(attn).astype(x.dtype)

        h = OffsetRMSNorm(cfg.rms_eps, name="pre_feedforward_layernorm")(x)
        gate = _dense(cfg.d_ff, "gate_proj", dtype)(h)
        up = _dense(cfg.d_ff, "up_proj", dtype)(h)
        mlp = _dense(cfg.d_model, "down_proj", dtype)(
            nn.gelu(gate, approximate=not cfg.exact_gelu) * up)
        x = x + OffsetRMSNorm(cfg.rms_eps, name="post_feedforward_layernorm")(mlp).astype(x.dtype)
        return x, new_kv


class Gemma2(nn.Module):
    """Decoder-only LM. Parameter names follow HF (`embed_tokens`, `layers/q_proj`, `norm`, ...;
    norms keep HF's `weight`, the offset from one). `remat` and `unroll` as in `Llama`."""

    config: Gemma2Config
    remat: str = "none"
    unroll: int = 1

    def setup(self):
        cfg = self.config
        layer = DecoderLayer
        if self.remat != "none":
            layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.d_model,
                                     embedding_init=nn.initializers.normal(0.125))
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            # x; cos, sin, mask, window_mask shared; is_sliding, prefix, cache per layer;
            # cache_index shared; key_mask per layer
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, 0,
                     nn.broadcast, 0),
            length=cfg.n_layers,
            unroll=self.unroll,
        )(cfg)
        self.norm = OffsetRMSNorm(cfg.rms_eps)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg.vocab_size, "lm_head", jnp.dtype(cfg.dtype))

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
    ) -> tuple[jax.Array, KV]:
        """tokens, positions `[B, T]`; mask `[B, T, S]` (the base mask: every key a query may
        see; sliding layers narrow it themselves). `key_mask` `[L, S]`, `return_hidden` and the
        returned K/V as in `Llama.__call__`; layer inputs are sown the same way."""
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

        dtype = jnp.dtype(cfg.dtype)
        # transformers rounds the scale to the activation dtype (sqrt(3072) is 55.5 in bf16).
        x = self.embed_tokens(tokens).astype(dtype) * jnp.asarray(math.sqrt(cfg.d_model), dtype)
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        is_sliding = jnp.asarray([kind == "sliding_attention" for kind in cfg.layer_types])
        window_mask = sliding_window(mask, cfg.sliding_window) if cfg.sliding_window else mask
        x, kv = self.layers(x, cos, sin, mask, window_mask, is_sliding, prefix, cache,
                            cache_index, key_mask)
        x = self.norm(x)
        if return_hidden:
            return x, kv
        return self.logits(x), kv

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits for final hidden states `[..., d]`, soft-capped."""
        if self.config.tie_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcap
        if cap is None:
            return logits
        return jnp.tanh(logits.astype(jnp.float32) / cap).astype(logits.dtype) * cap
