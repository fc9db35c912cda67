"""prefix/masks.py: every variant's masks from one place, and the decoder's equal to training's
on the same prompt (so a cached decode computes what the train step trained)."""

import jax.numpy as jnp
import numpy as np
import pytest

from prefix_jax.models.core import bidirectional_mask, causal_mask
from prefix_jax.prefix import DecodeOptions, masks

P, T, L = 3, 6, 4  # prefix slots, prompt tokens, layers


def test_infix_is_unseen_by_the_source():
    segments = jnp.ones((2, T), jnp.int32)
    start = jnp.asarray([2, 4])  # each row's last source token
    mask, key_mask = masks.training(DecodeOptions(infix=True), segments, P, L, start)
    mask = np.asarray(mask)
    assert key_mask is None
    for row, s in enumerate([2, 4]):
        assert not mask[row, :s, :P].any()  # the source never sees the infix
        assert mask[row, s:, :P].all()  # the target's predicting queries do
    # the tokens among themselves stay causal
    np.testing.assert_array_equal(mask[:, :, P:], np.asarray(causal_mask(segments, 0)))


def test_infix_needs_the_target_start():
    with pytest.raises(ValueError, match="target_start"):
        masks.training(DecodeOptions(infix=True), jnp.ones((1, T), jnp.int32), P, L)


def test_layer_subset_key_mask():
    key_mask = np.asarray(masks.key_mask((1, 3), L, P, P + T))
    assert key_mask.shape == (L, P + T)
    np.testing.assert_array_equal(key_mask[:, :P].all(1), [False, True, False, True])
    np.testing.assert_array_equal(key_mask[:, :P].any(1), [False, True, False, True])
    assert key_mask[:, P:].all()  # real tokens are never hidden by it
    assert masks.key_mask(None, L, P, P + T) is None
    traced = masks.key_mask_from(jnp.asarray([False, True, False, True]), P, P + T)
    np.testing.assert_array_equal(np.asarray(traced), key_mask)


def test_training_mask_with_layer_on_overrides_the_options():
    segments = jnp.ones((1, T), jnp.int32)
    layer_on = jnp.asarray([True, False, False, False])
    _, key_mask = masks.training(DecodeOptions(prefix_layers=(1, 2)), segments, P, L,
                                 layer_on=layer_on)
    np.testing.assert_array_equal(np.asarray(key_mask),
                                  np.asarray(masks.key_mask((0,), L, P, P + T)))


def test_encoder_mask_is_bidirectional_with_the_layer_subset():
    segments = jnp.asarray([[1, 1, 1, 1, 0, 0]])
    mask, key_mask = masks.encoder(DecodeOptions(prefix_layers=(0,)), segments, P, L)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(bidirectional_mask(segments, P)))
    np.testing.assert_array_equal(np.asarray(key_mask),
                                  np.asarray(masks.key_mask((0,), L, P, P + T)))


@pytest.mark.parametrize("options", [DecodeOptions(), DecodeOptions(infix=True),
                                     DecodeOptions(prefix_layers=(2,)),
                                     DecodeOptions(infix=True, prefix_layers=(0, 3))],
                         ids=["prefix", "infix", "top-layer", "infix-layers"])
def test_decode_prefill_mask_equals_the_training_mask(options):
    """A prompt decoded from a cache sees what the same prompt saw in training, where its last
    token is the first that predicts the target."""
    new_tokens = 4
    n_slots = P + T + new_tokens
    slot_valid = jnp.ones((1, n_slots), bool)
    mask, key_mask = masks.prefill(options, slot_valid, P, T, L)
    train_mask, train_key_mask = masks.training(options, jnp.ones((1, T), jnp.int32), P, L,
                                                jnp.asarray([T - 1]))
    mask = np.asarray(mask)
    np.testing.assert_array_equal(mask[:, :, :P + T], np.asarray(train_mask))
    assert not mask[:, :, P + T:].any()  # the slots of tokens not generated yet
    if options.prefix_layers is None:
        assert key_mask is None and train_key_mask is None
    else:
        np.testing.assert_array_equal(np.asarray(key_mask)[:, :P + T],
                                      np.asarray(train_key_mask))
    # every generated token sees the prefix (it is target), whatever the placement
    step = np.asarray(masks.step(slot_valid, jnp.int32(P + T)))
    assert step.shape == (1, 1, n_slots)
    assert step[0, 0, :P + T + 1].all() and not step[0, 0, P + T + 1:].any()


def test_prefill_hides_left_padding():
    valid = jnp.asarray([[False, False, True, True, True, True]])
    slot_valid = jnp.concatenate([jnp.ones((1, P), bool), valid, jnp.ones((1, 2), bool)], 1)
    mask, _ = masks.prefill(DecodeOptions(), slot_valid, P, T, L)
    mask = np.asarray(mask)
    assert not mask[:, :, P:P + 2].any()  # nobody attends to the padding slots
    assert mask[0, 2:, :P].all()
