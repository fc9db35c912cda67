"""What every backbone shares: the K/V container, grouped-query attention, the base attention
masks, RMSNorm, rotary positions, prefix concatenation and the remat policies.

A backbone (llama.py, gpt2.py, bert.py) builds its own layers from these; code outside models/
imports them from here, never from one backbone's file. The masks here know nothing about prefix
variants (infix, layer subsets): `prefix.masks` builds those on top of them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

# Mesh axes that split batch rows (training/sharding.py builds the mesh with these names).
BATCH_MESH_AXES = ("data", "fsdp")

# `remat` option -> what a layer keeps for the backward pass (the rest is recomputed).
REMAT_POLICIES = {
    "none": None,  # keep every activation (fastest; memory grows with sequence length)
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}


def shard_rows(x: jax.Array) -> jax.Array:
    """`x` with its leading (row) axis split over the batch axes of the mesh set by
    `jax.set_mesh` (the train step is traced under it); unchanged without such a mesh or when
    the rows do not divide. Without this constraint XLA's sharding propagation may keep every
    row on every device and split the FSDP-sharded `embed` dimension of the activations instead
    (bench/plan.py measured it: 8x the activation memory per device on an fsdp=8 mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in BATCH_MESH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes))


class KV(NamedTuple):
    """Keys and values, `[L, B, S, n_kv_heads, head_dim]` each (a prefix or a decoding cache)."""

    k: jax.Array
    v: jax.Array


class SplitCache(NamedTuple):
    """A decoding cache in two parts, so that hypotheses of one prompt never copy what they share.

    `shared` `[L, B, S0, K, D]`: the prefix and the prompt, stored once per prompt.
    `own` `[L, B * W, N, K, D]`: one slot per generated token, in the row of the hypothesis
    (row b * W + w) that wrote it; rows are never reordered.
    `ancestry` `[L, B * W, N]` (the same for every layer; the leading axis only lets the layer scan
    slice it like the rest): for each hypothesis, which of its prompt's W rows holds its token at
    each generated slot. Beam search extends a hypothesis by copying its parent's ancestry (a
    small int array) instead of its keys and values. Greedy decoding is the case W = 1.
    """

    shared: KV
    own: KV
    ancestry: jax.Array


def n_cache_slots(cache: KV | SplitCache) -> int:
    """The key slots a query over `cache` sees (its mask's last axis)."""
    if isinstance(cache, SplitCache):
        return cache.shared.k.shape[2] + cache.own.k.shape[2]
    return cache.k.shape[2]


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
    """The standard RoPE inverse frequencies `[head_dim / 2]` (float32)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_angles(positions: jax.Array, head_dim: int, theta: float,
                inv_freq: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B, T, head_dim]` in the half-split layout used by HF Llama checkpoints;
    `inv_freq` replaces the standard frequencies of `theta` (scaled RoPE variants)."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, theta)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x` `[B, T, H, D]` by per-position angles `[B, T, D]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale).astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
           scale: float | None = None, softcap: float | None = None) -> jax.Array:
    """Grouped-query attention without materializing repeated K/V.

    q `[B, T, H, D]`, k and v `[B, S, K, D]` with H a multiple of K, mask `[B, T, S]` (True = may
    attend). Returns `[B, T, H * D]`. A row with no allowed key (padding) gets a uniform average,
    never NaN. Scores are `q.k * scale` (default `D ** -0.5`); with `softcap` they are then
    squashed to `softcap * tanh(score / softcap)` before masking (Gemma 2).
    """
    b, t, h, d = q.shape
    n_kv = k.shape[2]
    q = q.reshape(b, t, n_kv, h // n_kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * (d**-0.5 if scale is None else scale)
    scores = scores.astype(jnp.float32)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h * d)


def _attend_split(q: jax.Array, shared: KV, own: KV, ancestry: jax.Array, mask: jax.Array,
                  scale: float | None, softcap: float | None) -> jax.Array:
    """`attend` over one layer of a SplitCache: q `[B * W, T, H, D]`, shared `[B, S0, K, D]`, own
    `[B * W, N, K, D]`, ancestry `[B * W, N]`, mask `[B * W, T, S0 + N]`.

    Each hypothesis reads the shared slots of its prompt directly, and its generated slots
    through its ancestry: the queries score every row of their prompt (W times the scores of
    the generated slots, a small array), a one-hot of the ancestry keeps the row each slot
    belongs to, and the same one-hot weights the values. No cache row is gathered or copied.
    """
    bw, t, h, d = q.shape
    b, _, n_kv, _ = shared.k.shape
    w, n = bw // b, own.k.shape[1]
    n_shared = shared.k.shape[1]
    q = q.reshape(b, w, t, n_kv, h // n_kv, d)
    own_k = own.k.reshape(b, w, n, n_kv, d)
    own_v = own.v.reshape(b, w, n, n_kv, d)
    # [B, W (hypothesis), N, W (row)]: 1 where the row holds the hypothesis's slot
    pick = jax.nn.one_hot(ancestry.reshape(b, w, n), w, dtype=jnp.float32)
    scale = d**-0.5 if scale is None else scale
    shared_scores = jnp.einsum("bwtkgd,bskd->bwkgts", q, shared.k) * scale
    row_scores = jnp.einsum("bwtkgd,brnkd->bwkgtnr", q, own_k).astype(jnp.float32) * scale
    own_scores = jnp.einsum("bwkgtnr,bwnr->bwkgtn", row_scores, pick)
    scores = jnp.concatenate([shared_scores.astype(jnp.float32), own_scores], axis=-1)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    mask = mask.reshape(b, w, 1, 1, t, n_shared + n)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    shared_probs = probs[..., :n_shared].astype(shared.v.dtype)
    row_probs = (probs[..., n_shared:, None] * pick[:, :, None, None, None]).astype(own.v.dtype)
    out = (jnp.einsum("bwkgts,bskd->bwtkgd", shared_probs, shared.v)
           + jnp.einsum("bwkgtnr,brnkd->bwtkgd", row_probs, own_v))
    return out.reshape(bw, t, h * d)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, prefix: KV | None,
                     cache: KV | SplitCache | None, cache_index, mask: jax.Array, dtype, *,
                     scale: float | None = None, softcap: float | None = None
                     ) -> tuple[jax.Array, KV]:
    """A decoder layer's attention `[B, T, H * D]` and the K/V it returns.

    Without a cache or with a `KV` cache: `layer_keys_values` then `attend`. With a
    `SplitCache`, this call's tokens go into each row's generated slot `cache_index` for this
    attention only, and the layer returns just this call's `k`, `v` `[B, T, K, D]`: the decoder
    writes them into the cache once, outside the layer stack, so no step copies the cache.
    """
    if isinstance(cache, SplitCache):
        own = KV(*(jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), cache_index, axis=1)
                   for c, x in zip(cache.own, (k, v))))
        shared = KV(cache.shared.k.astype(dtype), cache.shared.v.astype(dtype))
        own = KV(own.k.astype(dtype), own.v.astype(dtype))
        return _attend_split(q, shared, own, cache.ancestry, mask, scale, softcap), KV(k, v)
    keys, values, new_kv = layer_keys_values(k, v, prefix, cache, cache_index)
    return attend(q, keys.astype(dtype), values.astype(dtype), mask, scale=scale,
                  softcap=softcap), new_kv


def with_layer_keys(mask: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    """One layer's mask `[B, T, S]` narrowed by its row `[S]` of a per-layer key mask (a prefix
    that acts in some layers only keeps its slots everywhere and hides them where it is off)."""
    return mask if key_mask is None else mask & key_mask[None, None, :]


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


def bidirectional_mask(segment_ids: jax.Array, n_prefix: int) -> jax.Array:
    """`[B, T, P + T]`: every query sees all P prefix slots and every real token of its own
    segment (0 = padding, never seen). Padding queries see the prefix too (their outputs are
    never read), so no row is empty."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids > 0)[:, None, :]
    prefix_mask = jnp.ones((*segment_ids.shape, n_prefix), dtype=bool)
    return jnp.concatenate([prefix_mask, same & real], axis=-1)


def sliding_window(mask: jax.Array, window: int) -> jax.Array:
    """`mask` `[B, T, S]` narrowed so each query sees only keys less than `window` positions
    back (itself included): transformers' `kv_idx > q_idx - sliding_window`.

    The distance of a key from a query is counted in the mask itself: the number of keys the
    query sees after that key. For a causal mask (with or without a cache, packing, padding or
    a prefix in front) that is exactly the difference of their positions, padding not counted
    and the P prefix slots standing at the P positions before the first real token; so one rule
    serves training, prefill and decoding steps, whatever position the first token has."""
    seen = mask.astype(jnp.int32)
    seen_later = jnp.cumsum(seen[..., ::-1], axis=-1)[..., ::-1] - seen
    return mask & (seen_later < window)


def cache_mask(slot_valid: jax.Array, query_slots: jax.Array) -> jax.Array:
    """`[B, T, S]` over a decoding cache: query t (written at slot `query_slots[t]`) sees the
    valid slots (`slot_valid` `[B, S]`, False on left padding) up to its own."""
    n_slots = slot_valid.shape[1]
    return slot_valid[:, None, :] & (jnp.arange(n_slots)[None, None, :]
                                     <= query_slots[None, :, None])
