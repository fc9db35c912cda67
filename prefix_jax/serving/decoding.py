"""Decoding with a KV cache whose first P slots hold the prefix (written once): greedy, sampling
(temperature, top-k, top-p) and beam search (beam size, length penalty, stop tokens).

One code path: `_prefill` runs the left-padded prompts over the cache once and `_step` feeds one
token per row; the greedy/sampling loop and the beam loop differ only in how they pick tokens.
Prompts are left-padded to a common length, so every row writes its new token into the same
cache slot each step; a per-slot validity mask hides the padding. Shapes depend only on (batch,
padded prompt length, settings), so batches of one bucket never recompile.

The prefix is `KV([L, B_p, P, K, D])` with `B_p` = 1 (one prefix shared by the batch) or B (each
row its own prefix, e.g. rows gathered from a bank of trained prefixes: `bank.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from prefix_jax import prefix as prefix_lib
from prefix_jax.models.backbone import Backbone
from prefix_jax.models.core import KV, SplitCache
from prefix_jax.prefix import masks
from prefix_jax.serving import context


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How to continue a prompt. Hashable: it is a static argument of the jitted decoder."""

    max_new_tokens: int = 64
    stop_ids: tuple[int, ...] = ()  # a row ends after emitting any of these (EOS goes here)
    pad_id: int = 0  # fills each row after its stop token
    num_beams: int = 1  # > 1: beam search
    length_penalty: float = 1.0  # beam: score = sum log p / (generated tokens ** length_penalty)
    do_sample: bool = False  # sample instead of argmax (num_beams must be 1)
    temperature: float = 1.0  # sampling: logits / temperature
    top_k: int = 0  # sampling: keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # sampling: keep the smallest set of tokens with this much probability
    # the trained prefix's positions, layers and placement (prefix.decode_options)
    prefix: prefix_lib.DecodeOptions = dataclasses.field(default_factory=prefix_lib.DecodeOptions)

    def __post_init__(self):
        checks = [
            (self.max_new_tokens > 0, f"max_new_tokens={self.max_new_tokens} must be > 0"),
            (self.num_beams >= 1, f"num_beams={self.num_beams} must be >= 1"),
            (not (self.do_sample and self.num_beams > 1),
             "sampling with num_beams > 1 is not supported; use one or the other"),
            (self.temperature > 0, f"temperature={self.temperature} must be > 0"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class Decoded(NamedTuple):
    tokens: jax.Array  # [B, max_new_tokens], `pad_id` after each row's stop token
    scores: jax.Array  # [B]: greedy/sampling: sum of log-probs; beam: the length-penalized score


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


class _Cache(NamedTuple):
    """The decoding state of B prompts x W hypotheses (W = 1 unless beam search)."""

    shared: KV  # [L, B, S0, K, D]: prefix and prompt slots, once per prompt
    own: KV  # [L, B * W, N, K, D]: one slot per generated token, in the row that wrote it
    ancestry: jax.Array  # [B * W, N]: which of its prompt's W rows holds a hypothesis's slot n
    slot_valid: jax.Array  # [B * W, S0 + N]: False on left padding
    next_position: jax.Array  # [B * W]: the next token's position
    key_mask: jax.Array | None  # [L, S0 + N]: False on the prefix slots of layers without one


def _prefill(module: Backbone, params: dict, prefix: KV | None, tokens: jax.Array,
             valid: jax.Array, settings: DecodeSettings) -> tuple[jax.Array, _Cache]:
    """The prompts over a fresh cache (prefix already in it); next-token logits `[B, V]` and
    the state of W = `settings.num_beams` hypotheses per prompt, which share the prompt's slots.
    """
    cfg = module.config
    b, t = tokens.shape
    w, n = settings.num_beams, settings.max_new_tokens
    n_prefix = 0 if prefix is None else prefix.k.shape[2]
    if prefix is not None and prefix.k.shape[1] not in (1, b):
        raise ValueError(f"prefix batch axis is {prefix.k.shape[1]}; it must be 1 (shared) or "
                         f"the batch size {b} (one prefix per row)")
    dtype = jnp.dtype(cfg.dtype)
    shape = (cfg.n_layers, b, n_prefix + t, cfg.n_kv_heads, cfg.head_dim)
    kv = KV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    if n_prefix:
        kv = KV(*(c.at[:, :, :n_prefix].set(
            jnp.broadcast_to(p, (cfg.n_layers, b, *p.shape[2:])).astype(dtype))
            for c, p in zip(kv, prefix)))
    shared_valid = jnp.concatenate([jnp.ones((b, n_prefix), bool), valid], axis=1)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0) + settings.prefix.position_offset
    mask, _ = masks.prefill(settings.prefix, shared_valid, n_prefix, t, cfg.n_layers)
    hidden, kv = module.apply({"params": params}, tokens, positions, mask, cache=kv,
                              cache_index=n_prefix, return_hidden=True,
                              key_mask=masks.key_mask(settings.prefix.prefix_layers,
                                                      cfg.n_layers, n_prefix, n_prefix + t))
    logits = module.apply({"params": params}, hidden[:, -1], method="logits")
    own_shape = (cfg.n_layers, b * w, n, cfg.n_kv_heads, cfg.head_dim)
    slot_valid = jnp.concatenate([jnp.repeat(shared_valid, w, axis=0),
                                  jnp.ones((b * w, n), bool)], axis=1)
    cache = _Cache(kv, KV(jnp.zeros(own_shape, dtype), jnp.zeros(own_shape, dtype)),
                   jnp.zeros((b * w, n), jnp.int32), slot_valid,
                   jnp.repeat(positions[:, -1] + 1, w, axis=0),
                   masks.key_mask(settings.prefix.prefix_layers, cfg.n_layers, n_prefix,
                                  n_prefix + t + n))
    return logits.astype(jnp.float32), cache


def _step(module: Backbone, params: dict, cache: _Cache, token: jax.Array, i: jax.Array
          ) -> tuple[jax.Array, _Cache]:
    """Feed generated token `i` of each hypothesis `[B * W]`; next-token logits `[B * W, V]`
    and the advanced cache. The token's keys and values go into its own row's slot `i`, the
    one place the cache is written, so the while loop updates it in place."""
    n_layers, n_shared = cache.shared.k.shape[0], cache.shared.k.shape[2]
    mask = masks.step(cache.slot_valid, n_shared + i)
    ancestry = jnp.broadcast_to(cache.ancestry, (n_layers, *cache.ancestry.shape))
    logits, new = module.apply({"params": params}, token[:, None], cache.next_position[:, None],
                               mask, cache=SplitCache(cache.shared, cache.own, ancestry),
                               cache_index=i, key_mask=cache.key_mask)
    own = KV(*(jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), i, axis=2)
               for c, x in zip(cache.own, new)))
    return logits[:, -1].astype(jnp.float32), cache._replace(
        own=own, next_position=cache.next_position + 1)


def _is_stop(token: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
    if not stop_ids:
        return jnp.zeros(token.shape, bool)
    return jnp.isin(token, jnp.asarray(stop_ids, token.dtype))


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) on `[B, V]` logits; dropped tokens -> -inf.

    Top-p keeps the most likely tokens up to and including the first at which the cumulative
    probability reaches `top_p` (at least one token).
    """
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
            keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def _greedy_or_sample(module: Backbone, params: dict, prefix: KV | None, tokens: jax.Array,
                      valid: jax.Array, settings: DecodeSettings, rng: jax.Array) -> Decoded:
    b = tokens.shape[0]
    n = settings.max_new_tokens
    logits, cache = _prefill(module, params, prefix, tokens, valid, settings)

    def pick(logits, i):
        if not settings.do_sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        kept = filter_logits(logits, settings.temperature, settings.top_k, settings.top_p)
        return jax.random.categorical(jax.random.fold_in(rng, i), kept).astype(jnp.int32)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, logits, cache, done, out, score = carry
        token = pick(logits, i)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        score = score + jnp.where(done, 0.0, logp)
        token = jnp.where(done, settings.pad_id, token)
        out = out.at[:, i].set(token)
        done = done | _is_stop(token, settings.stop_ids)
        # The last iteration's step is wasted work; skipping it would cost a cond in the loop.
        logits, cache = _step(module, params, cache, token, i)
        return i + 1, logits, cache, done, out, score

    out = jnp.full((b, n), settings.pad_id, jnp.int32)
    carry = (jnp.int32(0), logits, cache, jnp.zeros((b,), bool), out, jnp.zeros((b,), jnp.float32))
    _, _, _, _, out, score = jax.lax.while_loop(cond, body, carry)
    return Decoded(out, score)


def _beam_search(module: Backbone, params: dict, prefix: KV | None, tokens: jax.Array,
                 valid: jax.Array, settings: DecodeSettings) -> Decoded:
    """Beam search over `num_beams` hypotheses per prompt.

    Each step ranks the 2W best continuations of the W live beams. Those among the first W that
    end in a stop token (or reach `max_new_tokens`) are offered to the W finished hypotheses,
    scored `sum log p / length ** length_penalty` (length = generated tokens, stop token
    included); the best W that do not end stay live. A prompt is done when no live beam can
    still beat its worst finished hypothesis: log-probs only fall, so the bound is exact (the
    best live score over the longest possible length when `length_penalty` > 0, the shortest
    otherwise). This is transformers' beam search with `early_stopping="never"`.
    """
    b = tokens.shape[0]
    w, n, lp = settings.num_beams, settings.max_new_tokens, settings.length_penalty
    logits, cache = _prefill(module, params, prefix, tokens, valid, settings)
    # The prompt is read once per prompt and its slots stay shared by its beams (row b * W + beam).
    logits = jnp.repeat(logits, w, axis=0)
    vocab = logits.shape[-1]
    neg_inf = jnp.float32(-jnp.inf)

    def cond(carry):
        i, *_, done = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, logits, cache, live_logp, live_seq, fin_score, fin_seq, done = carry
        logp = jax.nn.log_softmax(logits).reshape(b, w, vocab) + live_logp[:, :, None]
        cand_logp, cand_index = jax.lax.top_k(logp.reshape(b, w * vocab), 2 * w)
        cand_beam, cand_token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
        cand_seq = jnp.take_along_axis(live_seq, cand_beam[:, :, None], axis=1)
        cand_seq = cand_seq.at[:, :, i].set(cand_token)
        ends = _is_stop(cand_token, settings.stop_ids) | (i == n - 1)

        # Finished: stop-token candidates among the first W, merged with the kept ones.
        offered = ends & (jnp.arange(2 * w) < w)[None]
        new_score = jnp.where(offered & ~done[:, None],
                              cand_logp / (i + 1.0) ** lp, neg_inf)
        merged_score = jnp.concatenate([fin_score, new_score], axis=1)
        fin_score, keep = jax.lax.top_k(merged_score, w)
        fin_seq = jnp.take_along_axis(jnp.concatenate([fin_seq, cand_seq], axis=1),
                                      keep[:, :, None], axis=1)

        # Live: the W best candidates that did not end.
        live_logp, keep = jax.lax.top_k(jnp.where(ends, neg_inf, cand_logp), w)
        live_seq = jnp.take_along_axis(cand_seq, keep[:, :, None], axis=1)
        parent = jnp.take_along_axis(cand_beam, keep, axis=1)
        # A beam inherits its parent's ancestry and writes its new token into its own row.
        ancestry = jnp.take_along_axis(cache.ancestry.reshape(b, w, n), parent[:, :, None], axis=1)
        ancestry = ancestry.at[:, :, i].set(jnp.arange(w)[None, :]).reshape(b * w, n)
        logits, cache = _step(module, params, cache._replace(ancestry=ancestry),
                              live_seq[:, :, i].reshape(-1), i)

        length = jnp.where(lp > 0, n, i + 2).astype(jnp.float32)
        best_possible = live_logp[:, 0] / length ** lp
        done = done | (fin_score[:, -1] >= best_possible)
        return i + 1, logits, cache, live_logp, live_seq, fin_score, fin_seq, done

    live_logp = jnp.tile(jnp.asarray([0.0] + [-jnp.inf] * (w - 1), jnp.float32), (b, 1))
    empty_seq = jnp.full((b, w, n), settings.pad_id, jnp.int32)
    carry = (jnp.int32(0), logits, cache, live_logp, empty_seq,
             jnp.full((b, w), neg_inf), empty_seq, jnp.zeros((b,), bool))
    *_, fin_score, fin_seq, _ = jax.lax.while_loop(cond, body, carry)
    return Decoded(fin_seq[:, 0], fin_score[:, 0])


@functools.partial(jax.jit, static_argnames=("module", "settings"))
def decode(module: Backbone, params: dict, prefix: KV | None, tokens: jax.Array, valid: jax.Array,
           settings: DecodeSettings, rng: jax.Array | None = None) -> Decoded:
    """Continue left-padded prompts (`tokens`, `valid`: `[B, T]`, see `left_pad`).

    `prefix`: None, `KV([L, 1, P, K, D])` for the whole batch, or `KV([L, B, P, K, D])` for one
    prefix per row. `rng` is needed only when sampling.
    """
    if settings.num_beams > 1:
        return _beam_search(module, params, prefix, tokens, valid, settings)
    if settings.do_sample and rng is None:
        raise ValueError("sampling needs an rng key")
    return _greedy_or_sample(module, params, prefix, tokens, valid, settings,
                             jax.random.key(0) if rng is None else rng)


def decode_texts(tokenizer, generated: np.ndarray, stop_ids: tuple[int, ...]) -> list[str]:
    """Token rows -> strings, each cut at its first stop token."""
    texts = []
    for row in np.asarray(generated):
        ids = row.tolist()
        ends = [ids.index(s) for s in stop_ids if s in ids]
        if ends:
            ids = ids[:min(ends)]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def settings_for(tokenizer, max_new_tokens: int, extra_stop_ids: tuple[int, ...] = (),
                 **kwargs) -> DecodeSettings:
    """Settings that stop at the tokenizer's EOS (plus `extra_stop_ids`) and pad with its pad id;
    `kwargs` are the other DecodeSettings fields (`prefix=` a trained prefix's options)."""
    from prefix_jax import models

    stop = (tokenizer.eos_token_id, *extra_stop_ids)
    return DecodeSettings(max_new_tokens=max_new_tokens, stop_ids=stop,
                          pad_id=models.pad_id(tokenizer), **kwargs)


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of the prompts in batches of `batch_size`, longest prompts first.

    Why sorted: a batch runs until its slowest row ends, and a data-to-text output's length
    follows its input's (more fields, more words), so rows of similar prompt lengths tend to end
    together and no row idles long; the left padding shrinks too. Sorting keeps every shape
    fixed (one compile per padded prompt length), where refilling finished rows from a queue
    would need per-row cache positions and a prefill inside the decoding loop. The sort is
    stable, so equal lengths keep their input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def generate(module: Backbone, params: dict, prefix: KV | None, tokenizer, prompts: list[str],
             batch_size: int, settings: DecodeSettings, prefix_rows: list[int] | None = None,
             seed: int = 0, progress: str | None = None) -> list[str]:
    """Generations for prompt strings, in input order, decoded in `length_sorted_batches` (the
    last batch padded to full size with copies of its last prompt, so every batch has one shape);
    `progress`: the label of a progress bar on stderr (None: no bar).

    With `prefix_rows` (one int per prompt), `prefix` is a bank `KV([L, N, P, K, D])` and
    prompt i uses the bank's prefix `prefix_rows[i]`; otherwise `prefix` is shared (or None).
    Sampling draws batch k's tokens from `fold_in(key(seed), k)`.
    """
    if prefix_rows is not None and len(prefix_rows) != len(prompts):
        raise ValueError(f"{len(prefix_rows)} prefix rows for {len(prompts)} prompts")
    ids = tokenizer(prompts, add_special_tokens=False).input_ids
    context.check_fits(module.config, [len(i) for i in ids], settings.max_new_tokens,
                       settings.prefix.position_offset)
    texts: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(ids), desc=progress, unit="source", disable=progress is None,
               dynamic_ncols=True)
    for k, batch in enumerate(length_sorted_batches([len(x) for x in ids], batch_size)):
        n_real = len(batch)
        batch = batch + [batch[-1]] * (batch_size - n_real)  # one shape for every batch
        tokens, valid = left_pad([ids[i] for i in batch], settings.pad_id)
        batch_prefix = prefix
        if prefix_rows is not None:
            rows = np.asarray([prefix_rows[i] for i in batch])
            batch_prefix = KV(prefix.k[:, rows], prefix.v[:, rows])
        rng = jax.random.fold_in(jax.random.key(seed), k) if settings.do_sample else None
        out = decode(module, params, batch_prefix, jnp.asarray(tokens), jnp.asarray(valid),
                     settings, rng)
        generated = decode_texts(tokenizer, np.asarray(out.tokens)[:n_real], settings.stop_ids)
        for i, text in zip(batch, generated):
            texts[i] = text
        bar.update(n_real)
    bar.close()
    return texts
