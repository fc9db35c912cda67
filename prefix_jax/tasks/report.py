"""Reportable evaluation of a trained run (the evaluate tool's library): the newest checkpoint
of a workdir, decoded on a whole split of its own task or another text-to-text task, through
the same `ReportGeneration` evaluator that `eval.test_at_end` runs after training.
"""

from __future__ import annotations

import ml_collections

from prefix_jax import configs, tasks
from prefix_jax.errors import UserError
from prefix_jax.serving import bank
from prefix_jax.tasks import evaluators

TASKS = ("e2e", "dart")  # the text-to-text tasks with references to score against


def output_name(task: str, run_task: str, split: str) -> str:
    """`test` for the run's own task, `dart_test` for another: files never collide."""
    return split if task == run_task else f"{task}_{split}"


def evaluate_workdir(workdir: str, split: str, task: str | None = None,
                     data_dir: str | None = None, num_beams: int = 5,
                     length_penalty: float = 1.0, max_new_tokens: int = 64,
                     batch_size: int = 10, limit: int = 0) -> dict:
    """The newest checkpoint of a run, evaluated on `split` of its own task (or `task`);
    the record (scores + how they were made) is also written into the workdir."""
    run = bank.load([workdir])
    config = run.configs[0]
    run_task = config.data.task
    task = task or run_task
    if task not in TASKS:
        raise UserError(f"--task={task} is not one of {TASKS}")
    if data_dir is None:
        data_dir = config.data.dir if task == run_task else configs.default_data_dir(task)
    task_config = ml_collections.ConfigDict(
        {"data": {"task": task, "dir": data_dir, "extra_dirs": ""}})
    task_def = tasks.get(task_config, training=False)
    spec = ml_collections.ConfigDict(dict(
        type="generation", phase="end", split=split, limit=limit, metrics="report",
        num_beams=num_beams, batch_size=batch_size, max_new_tokens=max_new_tokens,
        length_penalty=length_penalty))
    evaluator = evaluators.ReportGeneration(task_def, output_name(task, run_task, split), spec)
    return evaluator.run(run.base.module, run.base.params, run.row(0), run.options,
                         run.base.tokenizer, workdir, {"step": run.steps[0], "data_dir": data_dir})
