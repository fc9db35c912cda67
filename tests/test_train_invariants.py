"""Frozen means frozen: the base is bitwise unchanged, has no optimizer state, and costs no
weight-gradient FLOPs; the step trains the prefix."""

import functools

import jax
import numpy as np
import pytest

from prefix_jax import models, train
from prefix_jax.models.core import causal_mask
from prefix_jax.tasks import text_to_text
from prefix_jax.training import partition
from tests.helpers import runlocal_config, tiny_batch


@pytest.fixture(scope="module")
def tiny():
    return models.load(runlocal_config().model)


def _jit_step(setup):
    return jax.jit(functools.partial(train.train_step, model=setup.model, tx=setup.tx,
                                     loss_fn=text_to_text.lm_loss),
                   donate_argnums=(0,))


def test_base_bitwise_unchanged_and_prefix_trains(tiny):
    setup = train.create_train_state(runlocal_config(), tiny)
    base_before = jax.tree.map(lambda x: np.array(x, copy=True), tiny.params)
    prefix_before = np.array(setup.state.trainable["prefix"]["key"], copy=True)
    batch = tiny_batch(tiny.tokenizer)
    step = _jit_step(setup)
    state = setup.state
    for _ in range(3):
        state, _ = step(state, setup.frozen, batch)
    merged = partition.merge(state.trainable, setup.frozen)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                 merged["base"], base_before)
    assert not np.array_equal(np.asarray(state.trainable["prefix"]["key"]), prefix_before)
    assert int(state.step) == 3


def test_target_position_loss_equals_full_logits_loss(tiny):
    """Reading logits only at target positions changes no number of the loss."""
    setup = train.create_train_state(runlocal_config(), tiny)
    batch = tiny_batch(tiny.tokenizer)
    params = partition.merge(setup.state.trainable, setup.frozen)
    kv = setup.model.prefix_kv(params)
    positions = batch["positions"] + setup.model.options.position_offset  # as the run numbers them
    full, _ = tiny.module.apply({"params": tiny.params}, batch["tokens"], positions,
                                causal_mask(batch["segment_ids"], kv.k.shape[2]), prefix=kv)
    logp = jax.nn.log_softmax(full, axis=-1)
    total, count = 0.0, 0
    for row in range(batch["tokens"].shape[0]):
        for i, tok, w in zip(*(np.asarray(batch[k][row]) for k in
                               ("target_index", "target_tokens", "target_weight"))):
            if w:
                total, count = total - float(logp[row, i, tok]), count + 1
    got = float(text_to_text.lm_loss(setup.state.trainable, setup.frozen, batch, setup.model))
    np.testing.assert_allclose(got, total / count, rtol=1e-5)


def test_optimizer_state_has_no_base_sized_array(tiny):
    setup = train.create_train_state(runlocal_config(), tiny)
    prefix_shapes = {x.shape for x in jax.tree.leaves(setup.state.trainable["prefix"])}
    base_shapes = {x.shape for x in jax.tree.leaves(tiny.params)}
    opt_leaves = jax.tree.leaves(setup.state.opt_state)
    assert opt_leaves, "AdamW keeps moments for the prefix"
    for leaf in opt_leaves:
        assert leaf.shape in prefix_shapes | {()}, leaf.shape
        assert leaf.shape not in base_shapes
    # Holes, not arrays, where the base is.
    assert partition.count(setup.state.trainable["base"]) == 0


def _step_flops(setup, batch) -> float:
    compiled = _jit_step(setup).lower(setup.state, setup.frozen, batch).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"])


@pytest.mark.real_model
def test_prefix_step_flops_below_full_finetune(smollm2):
    """On the real SmolLM2 shapes (XLA cost analysis, nothing run): prefix <= 0.75 x full."""
    batch = tiny_batch(smollm2.tokenizer, n=4, bucket=64)
    prefix_flops = _step_flops(train.create_train_state(runlocal_config(), smollm2), batch)
    full = train.create_train_state(runlocal_config(trainable=r"^(base|prefix)/"), smollm2)
    assert partition.count(full.frozen) == 0
    full_flops = _step_flops(full, batch)
    ratio = prefix_flops / full_flops
    print(f"prefix/full step FLOPs: {ratio:.3f}")
    assert ratio <= 0.75, ratio


def test_trainable_regex_selects_layers(tiny):
    config = runlocal_config(trainable=r"^base/layers/(q_proj|v_proj)/")
    setup = train.create_train_state(config, tiny)
    assert partition.trainable_paths(setup.labels) == ["base/layers/q_proj/kernel",
                                                       "base/layers/v_proj/kernel"]
