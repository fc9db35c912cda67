"""A Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) whose attention takes
a per-layer prefix of keys and values.

Layers are stacked with `nn.scan`, so every per-layer parameter has a leading `layers` axis (one
compile of one layer instead of thirty) and a prefix is one array `[L, B, P, n_kv_heads, head_dim]`.

Two ways to call the model, one code path:
- no cache: keys/values are `concat(prefix, this sequence)`; the mask is `[B, T, P + T]`.
- with a cache `[L, B, S, K, D]` (decoding): this call's keys/values are written at `cache_index`
  and the queries attend over the whole cache; the mask is `[B, T, S]`. The prefix lives in the
  cache's first slots, written once by the decoder, so it is not passed again.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp


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

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")


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
    (r"(^|/)norm/scale$", ("embed",)),
    (r"lm_head/kernel$", ("embed", "vocab")),
)

# `remat` option -> what a layer keeps for the backward pass (the rest is recomputed).
REMAT_POLICIES = {
    "none": None,  # keep every activation (fastest; memory grows with sequence length)
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}


class KV(NamedTuple):
    """Keys and values, `[L, B, S, n_kv_heads, head_dim]` each (a prefix or a decoding cache)."""

    k: jax.Array
    v: jax.Array


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B, T, head_dim]` in the half-split layout used by HF Llama checkpoints."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x` `[B, T, H, D]` by per-position angles `[B, T, D]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention without materializing repeated K/V.

    q `[B, T, H, D]`, k and v `[B, S, K, D]` with H a multiple of K, mask `[B, T, S]` (True = may
    attend). Returns `[B, T, H * D]`. A row with no allowed key (padding) gets a uniform average,
    never NaN.
    """
    b, t, h, d = q.shape
    n_kv = k.shape[2]
    q = q.reshape(b, t, n_kv, h // n_kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * (d**-0.5)
    scores = scores.astype(jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h * d)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale).astype(x.dtype)


def prepend_prefix(prefix: KV | None, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's keys and values `[B, T, K, D]` with the prefix's `[B | 1, P, K, D]` in front.

    A prefix shared by the batch arrives with B=1; broadcasting it here keeps the trainable
    array small and lets rows carry their own prefixes when B matches."""
    if prefix is None:
        return k, v
    b = k.shape[0]
    pk = jnp.broadcast_to(prefix.k, (b, *prefix.k.shape[1:])).astype(k.dtype)
    pv = jnp.broadcast_to(prefix.v, (b, *prefix.v.shape[1:])).astype(v.dtype)
    return jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)


def layer_keys_values(k: jax.Array, v: jax.Array, prefix: KV | None, cache: KV | None,
                      cache_index) -> tuple[jax.Array, jax.Array, KV]:
    """(keys, values) a decoder layer attends over, and the K/V it returns: with a cache, this
    call's `k`, `v` written at `cache_index` (the prefix is already in its first slots);
    without one, `concat(prefix, k/v)` and this sequence's own K/V."""
    if cache is not None:
        keys = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype),
                                                   cache_index, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype),
                                                     cache_index, axis=1)
        return keys, values, KV(keys, values)
    keys, values = prepend_prefix(prefix, k, v)
    return keys, values, KV(k, v)


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.param("scale", nn.initializers.ones, (x.shape[-1],)), self.eps)


def _dense(features: int, name: str, dtype) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, name=name,
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
        self.sow("intermediates", "layer_input", x)
        if key_mask is not None:  # this layer's extra mask over key slots (prefix layer subsets)
            mask = mask & key_mask[None, None, :]
        h = RMSNorm(cfg.rms_eps, name="input_layernorm")(x)
        q = _dense(cfg.n_heads * cfg.head_dim, "q_proj", dtype)(h).reshape(b, t, cfg.n_heads, -1)
        k = _dense(cfg.n_kv_heads * cfg.head_dim, "k_proj", dtype)(h).reshape(
            b, t, cfg.n_kv_heads, -1)
        v = _dense(cfg.n_kv_heads * cfg.head_dim, "v_proj", dtype)(h).reshape(
            b, t, cfg.n_kv_heads, -1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        keys, values, new_kv = layer_keys_values(k, v, prefix, cache, cache_index)
        attn = attend(q, keys.astype(dtype), values.astype(dtype), mask)
        x = x + _dense(cfg.d_model, "o_proj", dtype)(attn).astype(x.dtype)

        h = RMSNorm(cfg.rms_eps, name="post_attention_layernorm")(x)
        gate = _dense(cfg.d_ff, "gate_proj", dtype)(h)
        up = _dense(cfg.d_ff, "up_proj", dtype)(h)
        x = x + _dense(cfg.d_model, "down_proj", dtype)(nn.silu(gate) * up).astype(x.dtype)
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
        n_keys = cache.k.shape[2] if cache is not None else n_prefix + t
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
        x = x.astype(jnp.dtype(cfg.dtype))
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
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


def causal_mask(segment_ids: jax.Array, n_prefix: int) -> jax.Array:
    """`[B, T, P + T]` mask for a (possibly packed, right-padded) batch without a cache.

    segment_ids `[B, T]`: 0 for padding, k > 0 for the k-th sequence packed in the row. Every
    query sees all P prefix slots; real tokens see earlier tokens of their own segment only.
    """
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    real = (segment_ids > 0)[:, None, :]
    seq_mask = same & causal & real
    prefix_mask = jnp.ones((*segment_ids.shape, n_prefix), dtype=bool)
    return jnp.concatenate([prefix_mask, seq_mask], axis=-1)
