"""The Task interface and evaluators as config: old configs mean what they meant, a
teacher-forced loss evaluator can be listed, DART's test evaluator runs through the same
interface as the evaluate tool, and a bad evaluator entry is one clear error."""

import math

import ml_collections
import numpy as np
import pytest

from prefix_jax import configs, models, tasks, train
from prefix_jax.errors import UserError
from prefix_jax.tasks import evals, text_to_text
from prefix_jax.tasks.base import EvalContext
from tests.helpers import runlocal_config


@pytest.fixture(scope="module")
def tiny():
    return models.load(runlocal_config().model)


def with_evals(config, **evaluators):
    config = config.copy_and_resolve_references()
    config.unlock()
    config.evals = configs.evals_config(**evaluators)
    return config.lock()


def test_a_config_without_evals_gets_what_config_eval_meant():
    task = tasks.get(runlocal_config())
    specs = evals.specs(runlocal_config(), task)
    assert list(specs) == ["dev"]
    dev = specs["dev"]
    assert (dev.type, dev.phase, dev.split, dev.limit, dev.metrics, dev.num_beams,
            dev.batch_size) == ("generation", "train", "dev", 4, "quick", 1, 50)
    config = runlocal_config(eval__test_at_end=True)
    test = evals.specs(config, task)["test"]
    assert (test.phase, test.split, test.limit, test.metrics, test.num_beams,
            test.batch_size) == ("end", "test", 0, "report", 5, 10)
    assert evals.specs(runlocal_config(eval__num_examples=0), task) == {}


def test_loss_evaluator_scores_teacher_forced_loss_and_perplexity(tiny):
    config = with_evals(runlocal_config(), dev={"type": "generation"},
                        dev_loss={"type": "loss", "limit": 3, "batch_size": 4})
    task = tasks.get(config)
    during, at_end = evals.build(config, task)
    assert list(during) == ["dev", "dev_loss"] and not at_end
    setup = train.create_train_state(config, tiny)
    params = {"base": tiny.params, "prefix": setup.state.trainable["prefix"]}
    scores = during["dev_loss"](setup.model, params, tiny.tokenizer, EvalContext(None))
    assert math.isclose(scores["perplexity"], math.exp(scores["loss"]), rel_tol=1e-9)
    # the same number the training loss gives on those rows, batched apart
    pairs = during["dev_loss"].pairs
    rows = text_to_text.tokenize_pairs(pairs, tiny.tokenizer, 480, "dev")
    batch = task.collate(rows, 16, models.pad_id(tiny.tokenizer))
    total, count = text_to_text.target_loss_sum(setup.model, params, batch)
    np.testing.assert_allclose(scores["loss"], float(total) / float(count), rtol=1e-5)
    untuned = during["dev_loss"](setup.model, params, tiny.tokenizer,
                                 EvalContext(None, with_prefix=False))
    assert untuned["loss"] != scores["loss"]


def test_two_evaluators_reporting_one_metric_is_an_error():
    config = with_evals(runlocal_config(), a={"type": "loss"}, b={"type": "loss"})
    with pytest.raises(UserError, match=r"evals.b and evals.a both report eval/loss"):
        evals.build(config, tasks.get(config))


@pytest.mark.parametrize("entry, message", [
    ({"type": "bleu"}, r"evals.x.type='bleu' must be one of"),
    ({"type": "accuracy"}, r"evals.x.type='accuracy' is not an evaluator of task 'e2e'"),
    ({"type": "loss", "beams": 2}, r"evals.x has unknown field\(s\) \['beams'\]"),
    ({"type": "loss", "phase": "later"}, r"evals.x.phase='later' must be one of"),
])
def test_bad_evaluator_entry_is_one_clear_error(entry, message):
    config = with_evals(runlocal_config(), x=entry)
    with pytest.raises(UserError, match=message):
        evals.build(config, tasks.get(config))


def test_dart_test_evaluator_runs_through_the_task_interface(tiny):
    config = ml_collections.ConfigDict({"data": {"task": "dart",
                                                 "dir": configs.default_data_dir("dart")}})
    with pytest.raises(UserError, match="DART has no train split"):
        tasks.get(config)
    task = tasks.get(config, training=False)
    spec = ml_collections.ConfigDict(dict(
        type="generation", phase="end", split="test", limit=2, metrics="report", num_beams=2,
        batch_size=2, max_new_tokens=4, length_penalty=1.0))
    evaluator = task.evaluator("dart_test", spec)
    setup = train.create_train_state(runlocal_config(), tiny)
    params = {"base": tiny.params, "prefix": setup.state.trainable["prefix"]}
    scores = evaluator(setup.model, params, tiny.tokenizer, EvalContext(None, step=3))
    assert list(scores) == ["bleu"] and len(evaluator.sources) == 2


def test_the_registry_names_every_task_and_refuses_others():
    assert tasks.TASKS == ("e2e", "dart", "sst2", "jsonl", "jsonl_classification")
    with pytest.raises(UserError, match=r"data.task='nosuch' is not one of"):
        tasks.get(runlocal_config(data__task="nosuch"))
