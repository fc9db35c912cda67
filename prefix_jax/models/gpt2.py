"""GPT-2 (Radford et al. 2019, the model of Li & Liang's prefix-tuning paper) with the call
interface of the Llama decoder (models/llama.py), so the train loop, decoding and the prefix bank
use it as is.

Differences from Llama that matter here: learned absolute position embeddings (`wpe`, added to
the token embeddings), LayerNorm with a bias, a fused QKV projection `c_attn` with biases as in HF
checkpoints, a GELU MLP (tanh approximation, HF's `gelu_new`), and an LM head tied to `wte`.
Prefix keys and values are concatenated in front of each layer's own, exactly as in Llama; they
carry no position (positions enter GPT-2 only through the input embeddings).

Because positions are learned, where real tokens' positions start (0, or P after a P-slot prefix
as HF/PEFT do with a cache) changes the function the prefix is trained against; see
`prefix.positions` in configs.py.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from prefix_jax.models.backbone import Capabilities
from prefix_jax.models.core import (
    KV,
    REMAT_POLICIES,
    cached_attention,
    n_cache_slots,
    with_layer_keys,
)

# Logical names of every parameter's dimensions, by path regex (see sharding.regex_axes).
# The fused QKV columns are split over `heads` like Llama's q_proj: any split is correct, and this
# one keeps each shard's columns contiguous.
LOGICAL_AXES = (
    (r"wte/embedding$", ("vocab", "embed")),
    (r"wpe/embedding$", (None, "embed")),
    (r"layers/c_attn/kernel$", ("layers", "embed", "heads")),
    (r"layers/c_attn/bias$", ("layers", "heads")),
    (r"layers/attn_proj/kernel$", ("layers", "heads", "embed")),
    (r"layers/c_fc/kernel$", ("layers", "embed", "mlp")),
    (r"layers/c_fc/bias$", ("layers", "mlp")),
    (r"layers/mlp_proj/kernel$", ("layers", "mlp", "embed")),
    (r"layers/(attn_proj|mlp_proj)/bias$", ("layers", "embed")),
    (r"layers/ln_[12]/(scale|bias)$", ("layers", "embed")),
    (r"(^|/)ln_f/(scale|bias)$", ("embed",)),
)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int = 1024  # number of learned positions (HF `n_positions`)
    ln_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype of activations; parameters keep their own

    name: ClassVar[str] = "GPT-2"
    # Only `kv`: hidden/input prefixes would need this family's own projection and position
    # handling, which no one has written and checked against a reference.
    capabilities: ClassVar[Capabilities] = Capabilities(
        kind="decoder", positions="learned", prefix_modes=("kv",))
    logical_axes: ClassVar[tuple] = LOGICAL_AXES

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")

    # The fields `prefix.build` and `decoding` read from any base model's config.
    @property
    def n_kv_heads(self) -> int:
        return self.n_heads  # plain multi-head attention

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def tie_embeddings(self) -> bool:
        return True


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the activation dtype (as HF does in practice)."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _dense(features: int, name: str, dtype) -> nn.Dense:
    return nn.Dense(features, use_bias=True, dtype=dtype, name=name,
                    kernel_init=nn.initializers.normal(0.02))


class GPT2Block(nn.Module):
    """One pre-LN block. Scanned over layers: (x, per-layer inputs) -> (x, this layer's K/V)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x, mask, prefix: KV | None, cache: KV | None, cache_index,
                 key_mask: jax.Array | None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, t, d = x.shape
        mask = with_layer_keys(mask, key_mask)
        h = LayerNorm(cfg.ln_eps, name="ln_1")(x)
        qkv = _dense(3 * d, "c_attn", dtype)(h)
        q, k, v = (y.reshape(b, t, cfg.n_heads, cfg.head_dim) for y in jnp.split(qkv, 3, -1))

        attn, new_kv = cached_attention(q, k, v, prefix, cache, cache_index, mask, dtype)
        x = x + _dense(d, "attn_proj", dtype)(attn).astype(x.dtype)

        h = LayerNorm(cfg.ln_eps, name="ln_2")(x)
        h = jax.nn.gelu(_dense(cfg.d_ff, "c_fc", dtype)(h), approximate=True)  # HF gelu_new
        x = x + _dense(d, "mlp_proj", dtype)(h).astype(x.dtype)
        return x, new_kv


class GPT2(nn.Module):
    """GPT-2 LM; the call signature and `logits` are those of the Llama decoder.

    Parameter names: `wte`, `wpe`, `layers/{ln_1,c_attn,attn_proj,ln_2,c_fc,mlp_proj}`, `ln_f`
    (HF's `attn.c_proj` and `mlp.c_proj` are `attn_proj` and `mlp_proj`; see hf_gpt2.py).
    """

    config: GPT2Config
    remat: str = "none"
    unroll: int = 1

    def setup(self):
        cfg = self.config
        block = GPT2Block
        if self.remat != "none":
            block = nn.remat(GPT2Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        self.wte = nn.Embed(cfg.vocab_size, cfg.d_model,
                            embedding_init=nn.initializers.normal(0.02))
        self.wpe = nn.Embed(cfg.max_seq_len, cfg.d_model,
                            embedding_init=nn.initializers.normal(0.01))
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, 0, 0, nn.broadcast, 0),
            length=cfg.n_layers,
            unroll=self.unroll,
        )(cfg)
        self.ln_f = LayerNorm(cfg.ln_eps)

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
        """As `Llama.__call__`: tokens, positions `[B, T]`; mask `[B, T, S]`; `key_mask`
        `[L, S]` per-layer key-slot mask; returns logits (or final hidden states) and the
        per-layer K/V (the updated cache when one is given)."""
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
                              (cfg.n_layers, None, None, cfg.n_heads, cfg.head_dim))

        dtype = jnp.dtype(cfg.dtype)
        x = self.wte(tokens).astype(dtype) + self.wpe(positions).astype(dtype)
        if key_mask is not None:
            chex.assert_shape(key_mask, (cfg.n_layers, n_keys))
        x, kv = self.layers(x, mask, prefix, cache, cache_index, key_mask)
        x = self.ln_f(x)
        if return_hidden:
            return x, kv
        return self.logits(x), kv

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits for final hidden states `[..., d]` (the head is `wte`, tied)."""
        return self.wte.attend(hidden)
