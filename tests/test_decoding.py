"""Cached greedy decoding equals recomputing the whole sequence, with a prefix, left padding and
either position convention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_jax import configs, decoding, models, prefix
from prefix_jax.models.llama import KV, causal_mask


@pytest.fixture(scope="module")
def tiny_with_prefix():
    loaded = models.load(configs.model_config("tiny"), seed=3)
    cfg = configs.prefix_config(length=4)
    module = prefix.build(cfg, loaded.config)
    kv = module.apply({"params": prefix.init(module, jax.random.key(1))})
    # Random tiny weights give flat logits; scale the prefix so it visibly changes them.
    return loaded, KV(kv.k * 3.0, kv.v * 3.0)


def _recompute_logits(loaded, kv, ids, offset):
    t = len(ids)
    logits, _ = loaded.module.apply({"params": loaded.params}, jnp.asarray([ids]),
                                    jnp.arange(t)[None] + offset,
                                    causal_mask(jnp.ones((1, t), int), prefix.length(kv)),
                                    prefix=kv)
    return np.asarray(logits[0, -1])


def _recompute_greedy(loaded, kv, ids, n, offset):
    ids = list(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(_recompute_logits(loaded, kv, ids, offset))))
        ids.append(out[-1])
    return out


@pytest.mark.parametrize("offset", [0, 4], ids=["positions-from-0", "positions-after-prefix"])
def test_cached_greedy_equals_recompute(tiny_with_prefix, offset):
    loaded, kv = tiny_with_prefix
    prompts = [[5, 9, 30, 41, 7], [100, 3], [60, 61, 62, 63, 64, 65, 66, 67, 68]]
    tokens, valid = decoding.left_pad(prompts, pad_id=2, multiple=16)
    # eos_id -1: never stop, so every row decodes all 6 tokens
    out = decoding.greedy(loaded.module, loaded.params, kv, jnp.asarray(tokens),
                          jnp.asarray(valid), 6, -1, 2, offset)
    for row, p in enumerate(prompts):
        assert np.asarray(out[row]).tolist() == _recompute_greedy(loaded, kv, p, 6, offset)


def test_cached_logits_equal_recompute(tiny_with_prefix):
    """One prefill plus one cached step gives the recomputed next-token logits (<= 1e-4)."""
    loaded, kv = tiny_with_prefix
    cfg, p = loaded.config, prefix.length(kv)
    ids = [11, 12, 13, 14, 15]
    n_slots = p + 8
    shape = (cfg.n_layers, 1, n_slots, cfg.n_kv_heads, cfg.head_dim)
    cache = KV(jnp.zeros(shape).at[:, :, :p].set(kv.k), jnp.zeros(shape).at[:, :, :p].set(kv.v))
    slots = jnp.arange(n_slots)
    mask = (slots[None, :] <= p + jnp.arange(5)[:, None])[None]
    _, cache = loaded.module.apply({"params": loaded.params}, jnp.asarray([ids]),
                                   jnp.arange(5)[None], mask, cache=cache, cache_index=p)
    mask = (slots <= p + 5)[None, None]
    logits, _ = loaded.module.apply({"params": loaded.params}, jnp.asarray([[16]]),
                                    jnp.asarray([[5]]), mask, cache=cache, cache_index=p + 5)
    want = _recompute_logits(loaded, kv, [*ids, 16], 0)
    np.testing.assert_allclose(np.asarray(logits[0, -1]), want, atol=1e-4, rtol=0)
    # The prefix matters: without it the logits differ.
    assert np.abs(_recompute_logits(loaded, None, [*ids, 16], 0) - want).max() > 1e-2


def test_generation_stops_at_eos_and_pads(tiny_with_prefix):
    loaded, kv = tiny_with_prefix
    tokens, valid = decoding.left_pad([[5, 9, 30]], pad_id=2, multiple=16)
    free = np.asarray(decoding.greedy(loaded.module, loaded.params, kv, jnp.asarray(tokens),
                                      jnp.asarray(valid), 6, -1, 2))[0]
    eos = int(free[2])  # pretend the third generated token is EOS
    stopped = np.asarray(decoding.greedy(loaded.module, loaded.params, kv, jnp.asarray(tokens),
                                         jnp.asarray(valid), 6, eos, 2))[0]
    first = free.tolist().index(eos)
    assert stopped[:first + 1].tolist() == free[:first + 1].tolist()
    assert (stopped[first + 1:] == 2).all()
