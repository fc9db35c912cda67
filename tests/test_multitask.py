"""Multi-task training: one prefix per task, batches whose rows use different prefixes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_jax import configs, models, prefix, train
from prefix_jax.serving import bank
from prefix_jax.tasks import text_to_text
from prefix_jax.tasks.base import Model
from prefix_jax.training import checkpoint
from tests.helpers import E2E_DIR, runlocal_config, tiny_batch


@pytest.fixture(scope="module")
def tiny():
    return models.load(configs.model_config("tiny"), seed=0)


def _model(loaded, n):
    module = prefix.build(configs.prefix_config(length=3), loaded.config, num_prefixes=n)
    return Model(loaded.module, module)


def test_mixed_batch_rows_equal_each_prefix_alone_and_gradients_stay_in_their_task(tiny):
    two = _model(tiny, 2)
    prefix_params = two.prefix.init(jax.random.key(5))["params"]
    assert prefix_params["task_keys"].shape == (2, 2, 3, 2, 16)  # [L, N, P, K, D]
    batch = dict(tiny_batch(tiny.tokenizer, n=4))
    batch["prefix_ids"] = jnp.asarray([0, 1, 1, 0], jnp.int32)
    params = {"base": tiny.params, "prefix": prefix_params}
    mixed = np.asarray(text_to_text.target_logits(two, params, batch))

    one = _model(tiny, 1)
    for task in (0, 1):
        alone_params = {"base": tiny.params,
                        "prefix": {"key": prefix_params["task_keys"][:, task],
                                   "value": prefix_params["task_values"][:, task]}}
        alone = np.asarray(text_to_text.target_logits(one, alone_params, batch))
        ids = np.asarray(batch["prefix_ids"])
        np.testing.assert_allclose(mixed[ids == task], alone[ids == task], atol=1e-5)
        # the other task's rows did use another prefix
        assert np.abs(mixed[ids != task] - alone[ids != task]).max() > 1e-3

    # Rows of task 0 only: task 1's prefix gets exactly zero gradient, task 0's does not.
    batch["prefix_ids"] = jnp.zeros(4, jnp.int32)
    grads = jax.grad(lambda p: _loss(two, tiny.params, p, batch))(prefix_params)
    assert np.abs(np.asarray(grads["task_keys"][:, 1])).max() == 0.0
    assert np.abs(np.asarray(grads["task_values"][:, 1])).max() == 0.0
    assert np.abs(np.asarray(grads["task_keys"][:, 0])).max() > 0.0


def _loss(model, base_params, prefix_params, batch):
    import optax

    params = {"base": base_params, "prefix": prefix_params}
    logits = text_to_text.target_logits(model, params, batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target_tokens"])
    return (ce * batch["target_weight"]).sum()


def test_multitask_run_trains_evaluates_and_serves_each_task(tmp_path):
    second = tmp_path / "e2e_copy"  # a second task dir in the E2E format
    second.mkdir()
    for name in ("trainset.csv", "devset.csv"):
        os.symlink(os.path.join(E2E_DIR, name), second / name)
    workdir = str(tmp_path / "run")
    config = runlocal_config(data__extra_dirs=str(second), train__num_steps=2,
                             train__eval_every=0, eval__num_examples=2,
                             eval__eval_untuned=False, eval__max_new_tokens=4)
    result = train.train_and_evaluate(config, workdir)
    assert {"eval/bleu", "eval/task1_bleu", "eval/task1_rouge_l"} <= set(result)
    assert os.path.exists(os.path.join(workdir, "generations", "dev_step2_task1.jsonl"))

    state = checkpoint.load_state_arrays(workdir)
    saved = np.asarray(state["trainable"]["prefix"]["task_keys"])
    assert saved.shape[1] == 2 and not np.allclose(saved[:, 0], saved[:, 1])
    run = bank.load([workdir])  # the two tasks become two rows of the bank
    assert run.prefixes.k.shape[1] == 2
    np.testing.assert_array_equal(np.asarray(run.row(1).k[:, 0]), saved[:, 1])
