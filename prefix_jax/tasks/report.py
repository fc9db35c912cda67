"""Reportable evaluation of a trained run (the evaluate tool's library): the newest checkpoint
of a workdir, decoded on a whole split of its own task or another text-to-text task, through
the same `ReportGeneration` evaluator that `eval.test_at_end` runs after training.
"""

from __future__ import annotations

import ml_collections
from etils import epath

from prefix_jax import configs, tasks
from prefix_jax.errors import UserError
from prefix_jax.serving import bank
from prefix_jax.tasks import evaluators
from prefix_jax.training import workdir as workdir_io

TASKS = ("e2e", "dart")  # the text-to-text tasks with references to score against


def output_name(task: str, run_task: str, split: str) -> str:
    """`test` for the run's own task, `dart_test` for another: files never collide."""
    return split if task == run_task else f"{task}_{split}"


def evaluate_workdir(workdir: str, split: str, task: str | None = None,
                     data_dir: str | None = None, num_beams: int = 5,
                     length_penalty: float = 1.0, max_new_tokens: int = 64,
                     batch_size: int = 10, limit: int = 0, overwrite: bool = False) -> dict:
    """The newest checkpoint of a run, evaluated on `split` of its own task (or `task`);
    the record (scores + how they were made) is also written into the workdir. An earlier
    record of that split made with other settings is refused before decoding, unless
    `overwrite`."""
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
    name = output_name(task, run_task, split)
    evaluator = evaluators.ReportGeneration(task_def, name, spec)  # checks Java for METEOR
    if not overwrite:
        planned = {"task": task, "split": split, "num_examples": len(evaluator.sources),
                   "step": run.steps[0], "data_dir": data_dir,
                   "decoding": {"num_beams": num_beams, "length_penalty": length_penalty,
                                "max_new_tokens": max_new_tokens, "do_sample": False}}
        check_no_other_result(workdir, name, planned)
    return evaluator.run(run.base.module, run.base.params, run.row(0), run.options,
                         run.base.tokenizer, workdir, {"step": run.steps[0], "data_dir": data_dir})


def check_no_other_result(workdir: str, name: str, planned: dict) -> None:
    """UserError when `workdir/eval_<name>.json` holds a result made with settings other than
    `planned` (fields recorded in both are compared; an unreadable record counts as other)."""
    existing_path = epath.Path(workdir) / f"eval_{name}.json"
    if not existing_path.exists():
        return
    try:
        existing = workdir_io.read_json(workdir, existing_path.name)
    except UserError:
        existing = None
    if not isinstance(existing, dict):
        differ = ["the file is unreadable"]
    else:
        differ = [f"{k} {existing[k]!r} -> {v!r}" for k, v in planned.items()
                  if k in existing and existing[k] != v]
    if differ:
        raise UserError(f"{existing_path} holds a result made with other settings ("
                        f"{'; '.join(differ)}); pass --overwrite to replace it, or evaluate "
                        "a copy of the workdir")
