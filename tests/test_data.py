"""E2E reading, loss masks, and the deterministic, checkpointable bucketed batches."""

import numpy as np
import pytest

from prefix_jax import models
from prefix_jax.data import pipeline
from prefix_jax.errors import UserError
from prefix_jax.tasks import e2e, text_to_text
from tests.helpers import E2E_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return models.byte_tokenizer()


def test_e2e_splits_and_references():
    dev = e2e.read_pairs(E2E_DIR, "dev")
    assert len(dev) == 4672
    sources, refs = e2e.group_references(dev)
    assert len(sources) == 547 and sum(len(r) for r in refs) == 4672
    assert sources[0] == "name[Alimentum], area[city centre], familyFriendly[no]"
    assert refs[0][0].startswith("There is a place in the city centre, Alimentum")


def test_loss_targets_are_exactly_the_target_and_eos(tokenizer):
    pairs = [e2e.Pair("name[A]", "A is a pub."), e2e.Pair("name[Bb], food[X]", "Bb.")]
    examples = text_to_text.tokenize_pairs(pairs, tokenizer, 128, "x")
    batch = pipeline.collate(examples, 16, pad_id=2)
    for row, ex in enumerate(examples):
        real = batch["target_weight"][row] > 0
        targets = batch["target_tokens"][row][real]
        assert tokenizer.decode(targets[:-1]) == " " + pairs[row].target
        assert targets[-1] == tokenizer.eos_token_id
        # The logits read at target_index predict the token that follows it in the sequence.
        np.testing.assert_array_equal(ex.tokens[batch["target_index"][row][real] + 1], targets)
        n = len(ex.tokens) - 1
        assert batch["segment_ids"][row, :n].all() and not batch["segment_ids"][row, n:].any()
    assert tokenizer.decode(batch["tokens"][0][:examples[0].n_source]) == "name[A]\nDescription:"
    assert batch["tokens"].shape[1] % 16 == 0 and batch["target_index"].shape[1] % 16 == 0


def test_too_long_pair_is_an_error(tokenizer):
    with pytest.raises(UserError, match=r"data\.max_len=8"):
        text_to_text.tokenize_pairs([e2e.Pair("name[A]", "A is a pub.")], tokenizer, 8, "f.csv")


def _examples(tokenizer, n=200):
    return text_to_text.tokenize_pairs(e2e.read_pairs(E2E_DIR, "dev")[:n], tokenizer, 512, "dev")


def test_batches_are_bucketed_and_cover_each_epoch_once(tokenizer):
    examples = _examples(tokenizer)
    plan = pipeline.BatchPlan(np.asarray([len(e.tokens) for e in examples]), 8, seed=0)
    epoch = [plan(i) for i in range(plan.batches_per_epoch)]
    assert sorted(np.concatenate(epoch).tolist()) == sorted(set(np.concatenate(epoch).tolist()))
    assert len(np.concatenate(epoch)) == 200
    lengths = np.asarray([len(e.tokens) for e in examples])
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in epoch])
    random_spread = np.mean([np.ptp(lengths[np.random.default_rng(i).choice(200, 8)])
                             for i in range(25)])
    assert spread < random_spread / 2, (spread, random_spread)
    assert not np.array_equal(plan(0), plan(plan.batches_per_epoch))  # epochs differ


def test_iterator_state_restores_the_exact_order(tokenizer):
    examples = _examples(tokenizer, 64)
    make = lambda: pipeline.train_iterator(examples, 4, 7, 16, 2, num_batches=12)
    it = make()
    for _ in range(5):
        next(it)
    state = it.get_state()
    rest = [next(it)["tokens"] for _ in range(7)]
    again = make()
    again.set_state(state)
    for want in rest:
        np.testing.assert_array_equal(next(again)["tokens"], want)


def test_process_shards_are_slices_of_the_global_batch(tokenizer):
    examples = _examples(tokenizer, 64)
    whole = next(pipeline.train_iterator(examples, 4, 1, 16, 2, 1))["tokens"]
    parts = [next(pipeline.train_iterator(examples, 4, 1, 16, 2, 1, i, 2))["tokens"]
             for i in range(2)]
    assert whole.shape[0] == 4 and all(p.shape == (2, whole.shape[1]) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole)
