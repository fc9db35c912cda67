"""Tasks: `get(config)` -> the `Task` (tasks/base.py) named by `config.data.task`.

The registry names each task's module and class; a module is imported only when its task is
asked for, so importing this package loads no reader, metric or model code.

- `e2e`: E2E NLG (and more E2E-format dirs in `data.extra_dirs`, one prefix per task).
- `dart`: DART (evaluation only: no train split ships here).
- `sst2`: SST-2 sentiment classification with a BERT encoder's head; dev accuracy and loss.
- `jsonl`, `jsonl_classification`: your own JSONL files, text-to-text on a decoder or
  text -> label on an encoder (tasks/jsonl.py).

A new task: a module with a `base.Task` subclass (or a `text_to_text.TextToTextTask` one) and
one line here.
"""

from __future__ import annotations

import importlib

import ml_collections

from prefix_jax.errors import UserError
from prefix_jax.tasks.base import Task

REGISTRY = {  # name -> (module, class)
    "e2e": ("prefix_jax.tasks.e2e", "E2E"),
    "dart": ("prefix_jax.tasks.dart", "Dart"),
    "sst2": ("prefix_jax.tasks.sst2", "SST2"),
    "jsonl": ("prefix_jax.tasks.jsonl", "JsonlTextToText"),
    "jsonl_classification": ("prefix_jax.tasks.jsonl", "JsonlClassification"),
}
TASKS = tuple(REGISTRY)


def get(config: ml_collections.ConfigDict, training: bool = True) -> Task:
    """The task named by `config.data.task`, its files read and checked (the training files
    too, unless `training` is False)."""
    name = config.data.task
    if name not in REGISTRY:
        raise UserError(f"data.task={name!r} is not one of {TASKS}")
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(module), cls)(config, training=training)


def check_model(task: Task, loaded) -> None:
    """The loaded base fits the task (a classifier needs an encoder with a head, and back)."""
    kind = loaded.config.capabilities.kind
    if kind != task.model_kind:
        article = "an" if task.model_kind == "encoder" else "a"
        raise UserError(f"data.task={task.name!r} needs {article} {task.model_kind} model but "
                        f"model.path={loaded.source} is a {kind} ({loaded.config.name}); use "
                        + ("model.path=minilm (or a BERT directory)" if kind == "decoder"
                           else "a decoder such as model.path=smollm2"))
