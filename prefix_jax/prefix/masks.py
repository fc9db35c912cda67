"""Every attention mask a prefix variant needs, in one place: training (decoder), encoder,
decoding (prefill and step), and the per-layer key masks of a prefix in some layers only.

Each builder returns what a backbone's call takes: `mask` `[B, T, S]` and `key_mask` `[L, S]`
(or None). The backbones only apply them; the base masks (causal, bidirectional, cache) come
from models/core.py and these add the variants on top:
- `infix` placement: the prefix slots are seen only by the queries that predict the target,
  i.e. from the last source (prompt) token on;
- a layer subset (`DecodeOptions.prefix_layers`, or a traced `[L]` bool for measurements):
  layers without the prefix keep its slots but hide them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from prefix_jax.models.core import bidirectional_mask, cache_mask, causal_mask

if TYPE_CHECKING:
    from prefix_jax.prefix import DecodeOptions


def key_mask(prefix_layers: tuple[int, ...] | None, n_layers: int, n_prefix: int,
             n_keys: int) -> jax.Array | None:
    """`[L, n_keys]`: False on the first `n_prefix` key slots of layers without the prefix
    (None: the prefix is in every layer)."""
    if prefix_layers is None:
        return None
    on = np.zeros(n_layers, bool)
    on[list(prefix_layers)] = True
    return key_mask_from(jnp.asarray(on), n_prefix, n_keys)


def key_mask_from(layer_on: jax.Array, n_prefix: int, n_keys: int) -> jax.Array:
    """`key_mask` from a (possibly traced) `[L]` bool of the layers that keep the prefix."""
    is_prefix_slot = jnp.arange(n_keys) < n_prefix
    return layer_on[:, None] | ~is_prefix_slot[None, :]


def _infix(mask: jax.Array, n_prefix: int, sees_from: jax.Array) -> jax.Array:
    """`mask` with the first `n_prefix` key slots hidden from queries before `sees_from` `[B]`
    (the index of each row's last source token)."""
    sees = jnp.arange(mask.shape[1])[None, :] >= sees_from[:, None]
    return mask.at[:, :, :n_prefix].set(mask[:, :, :n_prefix] & sees[:, :, None])


def training(options: DecodeOptions, segment_ids: jax.Array, n_prefix: int, n_layers: int,
             target_start: jax.Array | None = None, layer_on: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array | None]:
    """(mask `[B, T, P + T]`, key_mask) of a decoder batch without a cache.

    `target_start` `[B]`: the position of each row's last source token (the first query that
    predicts a target token), needed with infix placement. `layer_on` `[L]` (optional, may be
    traced) overrides `options.prefix_layers`.
    """
    mask = causal_mask(segment_ids, n_prefix)
    if options.infix:
        if target_start is None:
            raise ValueError("an infix prefix needs each row's target_start")
        mask = _infix(mask, n_prefix, target_start)
    if layer_on is not None:
        return mask, key_mask_from(layer_on, n_prefix, mask.shape[-1])
    return mask, key_mask(options.prefix_layers, n_layers, n_prefix, mask.shape[-1])


def encoder(options: DecodeOptions, segment_ids: jax.Array, n_prefix: int, n_layers: int
            ) -> tuple[jax.Array, jax.Array | None]:
    """(mask `[B, T, P + T]`, key_mask) of an encoder batch: bidirectional within segments,
    every query sees the prefix (an encoder has no infix: it has no target)."""
    mask = bidirectional_mask(segment_ids, n_prefix)
    return mask, key_mask(options.prefix_layers, n_layers, n_prefix, mask.shape[-1])


def prefill(options: DecodeOptions, slot_valid: jax.Array, n_prefix: int, n_prompt: int,
            n_layers: int) -> tuple[jax.Array, jax.Array | None]:
    """(mask `[B, T, S]`, key_mask `[L, S]`) of left-padded prompts `[B, T = n_prompt]` written
    into slots n_prefix .. n_prefix + T - 1 of a cache whose valid slots are `slot_valid`
    `[B, S]` (the prefix in the first `n_prefix`).

    With infix placement the prompt's last token (which predicts the first generated token) is
    the first that sees the prefix, as in `training`; every generated token sees it too (see
    `step`). The key mask is the cache's, for every step."""
    mask = cache_mask(slot_valid, n_prefix + jnp.arange(n_prompt))
    if options.infix:
        mask = _infix(mask, n_prefix, jnp.full((mask.shape[0],), n_prompt - 1))
    return mask, key_mask(options.prefix_layers, n_layers, n_prefix, slot_valid.shape[1])


def step(slot_valid: jax.Array, next_slot: jax.Array) -> jax.Array:
    """`[B, 1, S]` for one generated token per row written at `next_slot`: it sees every valid
    slot up to its own, the prefix included whatever the placement (generated tokens are
    target tokens); layer subsets come from the prefill's key mask."""
    return cache_mask(slot_valid, next_slot[None])
