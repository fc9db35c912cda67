"""Greedy decoding with a KV cache whose first P slots hold the prefix (written once).

Prompts are left-padded to a common length, so every row writes its new token into the same
cache slot each step; a per-slot validity mask hides the padding. Each new token costs one
forward pass of one position over the cache. Shapes depend only on (batch, padded prompt length,
max_new_tokens), so batches of one bucket never recompile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from prefix_jax import models
from prefix_jax.models.llama import KV, Llama


def left_pad(prompts: list[list[int]], pad_id: int, multiple: int = 16
             ) -> tuple[np.ndarray, np.ndarray]:
    """tokens `[B, T]` and validity `[B, T]` (bool), prompts right-aligned, T a multiple."""
    t = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    valid = np.zeros((len(prompts), t), bool)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p):] = p
        valid[i, t - len(p):] = True
    return tokens, valid


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "position_offset"))
def greedy(module: Llama, params: dict, prefix: KV | None, tokens: jax.Array, valid: jax.Array,
           max_new_tokens: int, eos_id: int, pad_id: int, position_offset: int = 0) -> jax.Array:
    """Greedy continuation `[B, max_new_tokens]` of left-padded prompts; pad after EOS.

    `position_offset` is where real tokens' positions start (0, or P for the HF/PEFT convention).
    """
    cfg = module.config
    b, t = tokens.shape
    n_prefix = 0 if prefix is None else prefix.k.shape[2]
    n_slots = n_prefix + t + max_new_tokens
    shape = (cfg.n_layers, b, n_slots, cfg.n_kv_heads, cfg.head_dim)
    cache = KV(jnp.zeros(shape, jnp.dtype(cfg.dtype)), jnp.zeros(shape, jnp.dtype(cfg.dtype)))
    if n_prefix:
        cache = KV(*(c.at[:, :, :n_prefix].set(jnp.broadcast_to(p, (cfg.n_layers, b, *p.shape[2:])
                                                                ).astype(c.dtype))
                     for c, p in zip(cache, prefix)))
    slot_valid = jnp.concatenate([jnp.ones((b, n_prefix), bool), valid,
                                  jnp.ones((b, max_new_tokens), bool)], axis=1)
    slots = jnp.arange(n_slots)

    def mask_upto(last_slots):  # [T] -> [B, T, S]: valid slots not after each query's own
        return slot_valid[:, None, :] & (slots[None, None, :] <= last_slots[None, :, None])

    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0) + position_offset
    logits, cache = module.apply({"params": params}, tokens, positions,
                                 mask_upto(n_prefix + jnp.arange(t)), cache=cache,
                                 cache_index=n_prefix)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, done, out = carry
        out = out.at[:, i].set(jnp.where(done, pad_id, token))
        done = done | (token == eos_id)
        slot = n_prefix + t + i
        pos = positions[:, -1:] + 1 + i
        logits, cache = module.apply({"params": params}, token[:, None], pos,
                                     mask_upto(slot[None]), cache=cache, cache_index=slot)
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return i + 1, token, cache, done, out

    carry = (jnp.int32(0), first, cache, jnp.zeros((b,), bool), out)
    return jax.lax.while_loop(cond, body, carry)[-1]


def decode_texts(tokenizer, generated: np.ndarray, eos_id: int) -> list[str]:
    """Token rows -> strings, cut at the first EOS."""
    texts = []
    for row in np.asarray(generated):
        ids = row.tolist()
        if eos_id in ids:
            ids = ids[:ids.index(eos_id)]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def generate(module: Llama, params: dict, prefix: KV | None, tokenizer, prompts: list[str],
             batch_size: int, max_new_tokens: int, position_offset: int = 0) -> list[str]:
    """Greedy generations for prompt strings, in batches (last batch padded to full size)."""
    eos, pad = tokenizer.eos_token_id, models.pad_id(tokenizer)
    ids = tokenizer(prompts, add_special_tokens=False).input_ids
    texts: list[str] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        n_real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n_real)  # one shape for every batch
        tokens, valid = left_pad(chunk, pad)
        out = greedy(module, params, prefix, jnp.asarray(tokens), jnp.asarray(valid),
                     max_new_tokens, eos, pad, position_offset)
        texts.extend(decode_texts(tokenizer, np.asarray(out)[:n_real], eos))
    return texts
