"""model.param_dtype=int8 (models/int8.py): per-channel int8 kernels, dequantized in the matmul,
never trained, never in the optimizer or a checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_jax import configs, models, train
from prefix_jax.errors import UserError
from prefix_jax.models import int8
from prefix_jax.models.core import causal_mask
from prefix_jax.training import checkpoint
from tests.helpers import runlocal_config


def _load(path: str, param_dtype: str):
    cfg = configs.model_config(path)
    cfg.param_dtype = param_dtype
    return models.load(cfg)


def test_quantize_kernel_is_within_half_a_step_per_output_channel():
    w = np.random.default_rng(0).normal(size=(3, 16, 8)).astype(np.float32)
    w[1, :, 2] = 0.0  # an all-zero column must not divide by zero
    q, scale = int8.quantize_kernel(w)
    assert q.dtype == jnp.int8 and scale.shape == (3, 8)
    error = np.abs(np.asarray(int8.dequantize_kernel(q, scale)) - w)
    assert np.all(error <= np.asarray(scale)[:, None, :] / 2 + 1e-7)
    assert np.all(np.asarray(int8.dequantize_kernel(q, scale))[1, :, 2] == 0)


def test_int8_tiny_base_computes_the_float_model_within_quantization_error():
    f32, q8 = _load("tiny", "float32"), _load("tiny", "int8")
    dtypes = {str(x.dtype) for x in jax.tree.leaves(q8.params)}
    assert dtypes == {"int8", "float32", "bfloat16"}  # kernels, their scales, the rest
    assert q8.params["layers"]["q_proj"]["kernel"].dtype == np.int8
    assert "hidden" not in q8.config.capabilities.prefix_modes  # it reads raw kernels
    tokens = jnp.arange(24)[None] % 200
    args = (tokens, jnp.arange(24)[None], causal_mask(jnp.ones_like(tokens), 0))
    ref, _ = f32.module.apply({"params": f32.params}, *args)
    out, _ = q8.module.apply({"params": q8.params}, *args)
    diff = float(jnp.max(jnp.abs(out - ref)))
    assert 0 < diff < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_int8_is_refused_for_a_backbone_without_it():
    with pytest.raises(UserError, match="param_dtype=int8 is implemented for Llama-family"):
        _load("tiny-gpt2", "int8")


def test_int8_leaves_never_enter_the_optimizer_or_the_checkpoint(tmp_path):
    config = runlocal_config(model__param_dtype="int8", train__num_steps=2,
                             train__checkpoint_every=2, eval__num_examples=0,
                             eval__eval_untuned=False, data__train_examples=8)
    loaded = _load("tiny", "int8")
    setup = train.create_train_state(config, loaded)
    in_state = {str(x.dtype) for x in jax.tree.leaves(setup.state)}
    assert in_state == {"float32", "int32"}  # the prefix, Adam's moments, the counters
    assert any(x.dtype == np.int8 for x in jax.tree.leaves(setup.frozen))

    train.train_and_evaluate(config, str(tmp_path))
    saved = checkpoint.load_state_arrays(str(tmp_path))
    leaves = jax.tree.leaves(saved)
    assert leaves and all(np.asarray(x).dtype != np.int8 for x in leaves)
    assert not any("base" in jax.tree_util.keystr(p) and "kernel" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0])
