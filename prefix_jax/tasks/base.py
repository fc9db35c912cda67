"""The Task interface: everything the train loop needs from a task, implemented whole by each.

A task reads and checks its files when it is constructed (before the workdir is touched),
turns them into tokenized training examples, collates those into batches, defines the training
loss, and builds the evaluators that `config.evals` names (see `tasks/evals.py`). The loop calls
these and nothing else, so a new task is one module plus one registry entry (tasks/__init__.py).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_collections

from prefix_jax import prefix
from prefix_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Model:
    """The base module and the prefix module: the code (not the weights) of a forward pass."""

    base: Any  # a backbone module (models/)
    prefix: prefix.Prefix
    options: prefix.DecodeOptions = dataclasses.field(default_factory=prefix.DecodeOptions)
    dropout_seed: int = 0  # prefix dropout's key, folded with the step

    def prefix_kv(self, params: dict, dropout_rng: jax.Array | None = None):
        """The per-layer keys/values of the prefix in `params` (`{"base", "prefix"}`)."""
        return prefix.compute(self.prefix, params["prefix"], self.base, params["base"],
                              dropout_rng)


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What an evaluator may write and print: given by the loop, never read from globals.

    `workdir` None means write nothing (every process but the first in a multi-host run, or a
    caller that only wants the scores).
    """

    workdir: str | None
    is_main: bool = True
    step: int = 0
    say: Callable[..., None] = print  # prints on the main process only
    with_prefix: bool = True  # False: the untuned base (the baseline beside the result)


class Evaluator(Protocol):
    """One named evaluation: scores (metric name -> float) of the model on some data."""

    metric_names: tuple[str, ...]  # the keys of its scores (checked for clashes up front)

    def __call__(self, model: Model, params: dict, tokenizer, ctx: EvalContext
                 ) -> dict[str, float]: ...


# What a loss receives: (trainable, frozen, batch, model, prefix dropout rng) -> scalar.
LossFn = Callable[[Any, Any, dict, Model, "jax.Array | None"], jax.Array]


class Task(abc.ABC):
    """A dataset and what is done with it. Subclasses read their files in `__init__`."""

    name: str
    model_kind: str = "decoder"  # the backbone kind it needs (models.backbone.Capabilities.kind)

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @abc.abstractmethod
    def train_examples(self, tokenizer) -> list:
        """Tokenized training examples (each with `tokens`), in file order."""

    @abc.abstractmethod
    def collate(self, examples: list, bucket_multiple: int, pad_id: int,
                widths: tuple[int, ...] | None = None) -> dict:
        """A padded numpy batch of `examples`, padded to `widths` when given."""

    @abc.abstractmethod
    def widths(self, examples: list, bucket_multiple: int) -> tuple[int, ...]:
        """The pad widths of a global batch of `examples` (every process pads alike)."""

    @abc.abstractmethod
    def loss(self, trainable, frozen, batch: dict[str, jax.Array], model: Model,
             dropout_rng: jax.Array | None = None) -> jax.Array:
        """The scalar training loss; differentiated w.r.t. `trainable` only. Must be a pure
        function of its arguments (it is traced once by jit)."""

    @abc.abstractmethod
    def evaluator(self, name: str, spec: ml_collections.ConfigDict) -> Evaluator:
        """The evaluator `spec` describes (`spec.type`: 'generation', 'loss', 'accuracy', ...);
        a type this task cannot run is a UserError naming it."""

    def describe_dev(self) -> str:
        """How the dev evaluation is made, for the closing 'untuned -> tuned' line."""
        return self.name


def unsupported(task: Task, name: str, spec, supported: tuple[str, ...]) -> UserError:
    return UserError(f"evals.{name}.type={spec.type!r} is not an evaluator of task "
                     f"{task.name!r}; use one of {supported}")
