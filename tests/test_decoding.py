"""Decoding: the cache equals recomputation; beam 1 equals greedy; a mixed-prefix batch equals
each prefix run alone; beam search and sampling on a bigram model whose answers are checked by
hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_jax import configs, models, prefix
from prefix_jax.models.core import KV, causal_mask
from prefix_jax.models.llama import Llama, LlamaConfig
from prefix_jax.serving import decoding
from prefix_jax.serving.decoding import DecodeSettings


@pytest.fixture(scope="module")
def tiny_with_prefix():
    loaded = models.load(configs.model_config("tiny"), seed=3)
    cfg = configs.prefix_config(length=4)
    module = prefix.build(cfg, loaded.config)
    kv = prefix.compute(module, prefix.init(module, jax.random.key(1)),
                        loaded.module, loaded.params)
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


def _decode(loaded, kv, prompts, rng=None, **settings):
    tokens, valid = decoding.left_pad(prompts, pad_id=2, multiple=16)
    settings.setdefault("pad_id", 2)
    return decoding.decode(loaded.module, loaded.params, kv, jnp.asarray(tokens),
                           jnp.asarray(valid), DecodeSettings(**settings), rng)


PROMPTS = [[5, 9, 30, 41, 7], [100, 3], [60, 61, 62, 63, 64, 65, 66, 67, 68]]


@pytest.mark.parametrize("offset", [0, 4], ids=["positions-from-0", "positions-after-prefix"])
def test_cached_greedy_equals_recompute(tiny_with_prefix, offset):
    loaded, kv = tiny_with_prefix
    # no stop token, so every row decodes all 6 tokens
    out = _decode(loaded, kv, PROMPTS, max_new_tokens=6,
                  prefix=prefix.DecodeOptions(position_offset=offset))
    for row, p in enumerate(PROMPTS):
        assert np.asarray(out.tokens[row]).tolist() == _recompute_greedy(loaded, kv, p, 6, offset)


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


def test_generation_stops_at_stop_token_and_pads(tiny_with_prefix):
    loaded, kv = tiny_with_prefix
    free = np.asarray(_decode(loaded, kv, [[5, 9, 30]], max_new_tokens=6).tokens)[0]
    stop = int(free[2])  # pretend the third generated token is a stop token
    stopped = np.asarray(_decode(loaded, kv, [[5, 9, 30]], max_new_tokens=6,
                                 stop_ids=(stop, 1000)).tokens)[0]
    first = free.tolist().index(stop)
    assert stopped[:first + 1].tolist() == free[:first + 1].tolist()
    assert (stopped[first + 1:] == 2).all()


@pytest.mark.parametrize("length_penalty,stop", [(0.0, True), (1.0, False)],
                         ids=["lp0-with-stop", "lp1-no-stop"])
def test_beam_1_equals_greedy(tiny_with_prefix, length_penalty, stop):
    """With one beam, beam search is greedy: exactly so when a stop token can end a hypothesis
    only if the length penalty is 0 (otherwise a longer hypothesis may legitimately score
    higher)."""
    loaded, kv = tiny_with_prefix
    greedy = _decode(loaded, kv, PROMPTS, max_new_tokens=8)
    stop_ids = (int(greedy.tokens[0, 3]), int(greedy.tokens[1, 5])) if stop else ()
    greedy = _decode(loaded, kv, PROMPTS, max_new_tokens=8, stop_ids=stop_ids)
    # decode() sends num_beams=1 to the greedy loop; call the beam loop itself.
    one_beam = decoding._beam_search(loaded.module, loaded.params, kv,
                                     *map(jnp.asarray, decoding.left_pad(PROMPTS, 2)),
                                     DecodeSettings(max_new_tokens=8, stop_ids=stop_ids,
                                                    pad_id=2, num_beams=1,
                                                    length_penalty=length_penalty))
    assert np.asarray(one_beam.tokens).tolist() == np.asarray(greedy.tokens).tolist()
    if stop:
        assert (np.asarray(greedy.tokens)[:2] == 2).any()  # the stop tokens did end rows
        # lp 0: the beam score is the greedy sum of log-probs
        np.testing.assert_allclose(one_beam.scores, greedy.scores, atol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_mixed_prefix_batch_equals_each_prefix_alone(tiny_with_prefix, num_beams):
    loaded, kv = tiny_with_prefix
    bank = KV(*(jnp.concatenate([x, x[:, :, ::-1] * -1.5, x * 0.5], axis=1) for x in kv))
    rows = [0, 2, 1]
    mixed = KV(bank.k[:, rows], bank.v[:, rows])
    got = _decode(loaded, mixed, PROMPTS, max_new_tokens=6, num_beams=num_beams)
    outputs = set()
    for i, (r, p) in enumerate(zip(rows, PROMPTS)):
        alone = _decode(loaded, KV(bank.k[:, r:r + 1], bank.v[:, r:r + 1]), [p],
                        max_new_tokens=6, num_beams=num_beams)
        assert np.asarray(got.tokens[i]).tolist() == np.asarray(alone.tokens[0]).tolist()
        np.testing.assert_allclose(got.scores[i], alone.scores[0], atol=1e-4)
        # and the prefixes differ in effect: the same prompt under another prefix decodes
        # differently for at least one row
        other = _decode(loaded, KV(bank.k[:, (r + 1) % 3:(r + 1) % 3 + 1],
                                   bank.v[:, (r + 1) % 3:(r + 1) % 3 + 1]), [p],
                        max_new_tokens=6, num_beams=num_beams)
        outputs.add(np.asarray(other.tokens[0]).tolist() != np.asarray(alone.tokens[0]).tolist())
    assert True in outputs


def test_generate_with_a_prefix_bank_equals_separate_runs(tiny_with_prefix):
    """decoding.generate with `prefix_rows` (batches padded to full size) = one prefix at a time."""
    loaded, kv = tiny_with_prefix
    bank = KV(*(jnp.concatenate([x, -x], axis=1) for x in kv))
    prompts = ["name[Aromi]", "eatType[pub], near[The Bakers]", "food[Thai]", "x"]
    rows = [1, 0, 0, 1]
    settings = decoding.settings_for(loaded.tokenizer, 5)
    got = decoding.generate(loaded.module, loaded.params, bank, loaded.tokenizer, prompts, 3,
                            settings, prefix_rows=rows)
    for r in (0, 1):
        alone = decoding.generate(loaded.module, loaded.params,
                                  KV(bank.k[:, r:r + 1], bank.v[:, r:r + 1]), loaded.tokenizer,
                                  [p for p, q in zip(prompts, rows) if q == r], 2, settings)
        assert [g for g, q in zip(got, rows) if q == r] == alone


# ---- A bigram model: a one-layer Llama whose next-token log-probs depend on the last token
# only, through a hand-written table, so beam search answers can be worked out on paper.

EOS, A, B, C, D, E = range(6)
BIGRAM = {  # P(next | last)
    A: {B: 0.5, C: 0.4, D: 0.1},
    B: {D: 0.45, E: 0.35, EOS: 0.2},
    C: {D: 0.9, EOS: 0.1},
    D: {EOS: 1.0},
    E: {EOS: 1.0},
    EOS: {EOS: 1.0},
}


@pytest.fixture(scope="module")
def bigram():
    """Layers add nothing (o_proj = down_proj = 0); the embedding is one-hot and the final norm
    undoes RMSNorm's sqrt(d) scale, so the LM head row of the last token is its log-probs."""
    d = 8
    cfg = LlamaConfig(vocab_size=6, d_model=d, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8,
                      d_ff=8, rms_eps=1e-12, tie_embeddings=False, max_seq_len=64)
    module = Llama(cfg)
    params = jax.tree.map(np.array, models.init_params(module, jax.random.key(0)))
    params["layers"]["o_proj"]["kernel"][:] = 0
    params["layers"]["down_proj"]["kernel"][:] = 0
    params["embed_tokens"]["embedding"] = np.eye(6, d, dtype=np.float32)
    params["norm"]["scale"] = np.full(d, d ** -0.5, np.float32)
    head = np.full((d, 6), math.log(1e-9), np.float32)
    for last, nexts in BIGRAM.items():
        for token, p in nexts.items():
            head[last, token] = math.log(p)
    params["lm_head"]["kernel"] = head
    return module, params


def _bigram_decode(bigram, prompts, rng=None, **settings):
    module, params = bigram
    tokens, valid = decoding.left_pad(prompts, pad_id=EOS, multiple=4)
    return decoding.decode(module, params, None, jnp.asarray(tokens), jnp.asarray(valid),
                           DecodeSettings(pad_id=EOS, stop_ids=(EOS,), **settings), rng)


def test_bigram_model_is_the_table(bigram):
    module, params = bigram
    logits, _ = module.apply({"params": params}, jnp.asarray([[C, A]]), jnp.asarray([[0, 1]]),
                             causal_mask(jnp.ones((1, 2), int), 0))
    np.testing.assert_allclose(np.exp(jax.nn.log_softmax(logits[0, -1]))[[B, C, D]],
                               [0.5, 0.4, 0.1], atol=1e-6)


def test_beam_search_hand_checked(bigram):
    """From A, greedy takes B (0.5) then D (0.45): B D EOS, p = 0.225. Beam 2 keeps C (0.4),
    whose D follows with 0.9: C D EOS, p = 0.36. At step 2 the candidates rank C-D .36,
    B-D .225, B-E .175, B-EOS .1, so B-EOS (ranked 4th of 2W = 4) is never offered."""
    greedy = _bigram_decode(bigram, [[A], [E, E, A]], max_new_tokens=4)
    assert np.asarray(greedy.tokens).tolist() == [[B, D, EOS, EOS]] * 2
    np.testing.assert_allclose(greedy.scores, [math.log(0.225)] * 2, atol=1e-5)
    for lp in (0.0, 1.0, 2.0):
        beam = _bigram_decode(bigram, [[A], [E, E, A]], max_new_tokens=4, num_beams=2,
                              length_penalty=lp)
        assert np.asarray(beam.tokens).tolist() == [[C, D, EOS, EOS]] * 2
        np.testing.assert_allclose(beam.scores, [math.log(0.36) / 3 ** lp] * 2, atol=1e-5)
    # With two new tokens at most, the unfinished hypotheses are scored at the limit: C D wins.
    short = _bigram_decode(bigram, [[A]], max_new_tokens=2, num_beams=2, length_penalty=1.0)
    assert np.asarray(short.tokens).tolist() == [[C, D]]
    np.testing.assert_allclose(short.scores, [math.log(0.36) / 2], atol=1e-5)
    # From B, EOS right away (0.2) beats every 3-token ending (D .45 or E .35, then EOS 1.0) only
    # when short hypotheses are favoured: length_penalty -2 gives log(.2)*1 = -1.61 against
    # log(.45)*4 = -3.19.
    favour_short = _bigram_decode(bigram, [[B]], max_new_tokens=4, num_beams=3,
                                  length_penalty=-2.0)
    assert np.asarray(favour_short.tokens).tolist() == [[EOS, EOS, EOS, EOS]]
    favour_long = _bigram_decode(bigram, [[B]], max_new_tokens=4, num_beams=3,
                                 length_penalty=1.0)
    assert np.asarray(favour_long.tokens).tolist() == [[D, EOS, EOS, EOS]]


def test_sampling_follows_the_filtered_distribution(bigram):
    """2,000 rows sampling one token after A (P = B .5, C .4, D .1)."""
    prompts = [[A]] * 2000

    def frequencies(**settings):
        out = _bigram_decode(bigram, prompts, max_new_tokens=1, do_sample=True,
                             rng=jax.random.key(7), **settings)
        first = np.asarray(out.tokens)[:, 0]
        return np.bincount(first, minlength=6)[[B, C, D]] / len(first)

    # Standard error of each frequency is at most sqrt(.25 / 2000) = 0.011.
    np.testing.assert_allclose(frequencies(), [0.5, 0.4, 0.1], atol=0.04)
    sharpened = np.array([0.25, 0.16, 0.01]) / 0.42  # temperature 0.5 squares the probabilities
    np.testing.assert_allclose(frequencies(temperature=0.5), sharpened, atol=0.04)
    np.testing.assert_allclose(frequencies(top_k=2), [0.5 / 0.9, 0.4 / 0.9, 0.0], atol=0.04)
    assert frequencies(top_p=0.5).tolist() == [1.0, 0.0, 0.0]  # B alone reaches 0.5
    top_p = frequencies(top_p=0.85)  # B + C reach 0.9
    assert top_p[2] == 0.0
    np.testing.assert_allclose(top_p, [0.5 / 0.9, 0.4 / 0.9, 0.0], atol=0.04)
    # top_k=1 is greedy whatever the temperature
    assert frequencies(top_k=1, temperature=3.0).tolist() == [1.0, 0.0, 0.0]


def test_settings_reject_bad_values():
    for bad in (dict(max_new_tokens=0), dict(num_beams=0), dict(temperature=0.0),
                dict(top_p=0.0), dict(top_k=-1), dict(do_sample=True, num_beams=2)):
        with pytest.raises(ValueError):
            DecodeSettings(**bad)


def test_batches_of_one_bucket_compile_once(tiny_with_prefix):
    """Five prompts of different lengths in batches of 2 (the last one padded): one compile."""
    loaded, kv = tiny_with_prefix
    settings = decoding.settings_for(loaded.tokenizer, 3, num_beams=2)
    before = decoding.decode._cache_size()
    prompts = ["a", "bb bb", "ccc ccc ccc", "d", "eeeeeeeee"]  # all within one 16-token bucket
    decoding.generate(loaded.module, loaded.params, kv, loaded.tokenizer, prompts, 2, settings)
    assert decoding.decode._cache_size() == before + 1


def test_length_sorted_batches_cover_every_prompt_once_longest_first():
    lengths = [3, 9, 5, 9, 1, 4, 7]
    batches = decoding.length_sorted_batches(lengths, 3)
    assert batches == [[1, 3, 6], [2, 5, 0], [4]]  # equal lengths keep their input order
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
