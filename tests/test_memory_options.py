"""Memory options change memory, not results: remat recomputes the same gradients with less
saved activation memory; a bfloat16 base keeps the prefix and optimizer state in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_jax import models, train
from prefix_jax.tasks import text_to_text
from tests.helpers import runlocal_config, tiny_batch


def _setup(**overrides):
    config = runlocal_config(**overrides)
    return train.create_train_state(config, models.load(config.model))


def _value_and_grad(setup, batch):
    return jax.jit(jax.value_and_grad(text_to_text.lm_loss), static_argnums=(3,))(
        setup.state.trainable, setup.frozen, batch, setup.model)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(policy):
    plain, remat = _setup(model__remat="none"), _setup(model__remat=policy)
    batch = tiny_batch(models.byte_tokenizer())
    loss, grads = _value_and_grad(plain, batch)
    loss_r, grads_r = _value_and_grad(remat, batch)
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
    for key in ("key", "value"):
        np.testing.assert_allclose(np.asarray(grads_r["prefix"][key]),
                                   np.asarray(grads["prefix"][key]), rtol=1e-5, atol=1e-7)


def test_full_remat_needs_less_temporary_memory_on_long_sequences():
    batch = tiny_batch(models.byte_tokenizer(), n=8, bucket=256)
    assert batch["tokens"].shape[1] >= 256

    def temp_bytes(setup):
        fn = jax.jit(jax.grad(text_to_text.lm_loss), static_argnums=(3,))
        compiled = fn.lower(setup.state.trainable, setup.frozen, batch, setup.model).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain = temp_bytes(_setup(model__remat="none"))
    remat = temp_bytes(_setup(model__remat="full"))
    assert remat < 0.8 * plain, (remat, plain)


def test_bfloat16_base_with_float32_prefix_and_optimizer_state():
    f32, bf16 = _setup(), _setup(model__param_dtype="bfloat16")
    base = jax.tree.leaves(bf16.frozen)
    assert base and all(x.dtype == jnp.bfloat16 for x in base)
    trainable_and_opt = jax.tree.leaves((bf16.state.trainable, bf16.state.opt_state))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in trainable_and_opt)
    assert sum(x.nbytes for x in base) * 2 == sum(x.nbytes for x in jax.tree.leaves(f32.frozen))
    batch = tiny_batch(models.byte_tokenizer())
    loss32 = float(text_to_text.lm_loss(f32.state.trainable, f32.frozen, batch, f32.model))
    loss16 = float(text_to_text.lm_loss(bf16.state.trainable, bf16.frozen, batch, bf16.model))
    # the same function of rounded weights: close, not equal
    assert loss16 != loss32 and abs(loss16 - loss32) < 0.02 * loss32
