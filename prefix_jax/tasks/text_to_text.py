"""The shared base of text-to-text tasks (E2E, DART, ...): a source is formatted into a prompt,
the target follows it, the model learns the target tokens by next-token cross-entropy, and is
evaluated by decoding (tasks/evaluators.py) or by its teacher-forced loss.

A subclass says how to read its splits (`read_pairs` for training and loss, `read_references`
for generation) and which metrics it reports (`report_scores`).
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from prefix_jax import configs, prefix
from prefix_jax.data import pipeline
from prefix_jax.errors import UserError
from prefix_jax.prefix import masks
from prefix_jax.tasks import base
from prefix_jax.training import partition


@dataclasses.dataclass(frozen=True)
class Pair:
    source: str  # e.g. an E2E meaning representation, a linearized DART triple set
    target: str  # one reference text


def format_source(source: str) -> str:
    """The prompt a pair's text is generated from (the target follows after a space)."""
    return f"{source}\nDescription:"


def group_references(pairs: list[Pair]) -> tuple[list[str], list[list[str]]]:
    """Unique sources in order of first appearance, with all references of each (rows sharing
    a source are its references, as in E2E)."""
    refs: dict[str, list[str]] = {}
    for p in pairs:
        refs.setdefault(p.source, []).append(p.target)
    return list(refs), list(refs.values())


def tokenize_pairs(pairs: list[Pair], tokenizer, max_len: int, where: str, prefix_id: int = 0,
                   prompt: Callable[[str], str] = format_source) -> list[pipeline.Tokenized]:
    """Source and target are tokenized apart, so the loss boundary is exact; `prompt` turns a
    source into the text the target follows (the task's `prompt`)."""
    sources = tokenizer([prompt(p.source) for p in pairs], add_special_tokens=False)
    targets = tokenizer([" " + p.target for p in pairs], add_special_tokens=False)
    eos = tokenizer.eos_token_id
    out = []
    for i, (s, t) in enumerate(zip(sources.input_ids, targets.input_ids)):
        ids = np.asarray([*s, *t, eos], dtype=np.int32)
        if len(ids) > max_len:
            raise UserError(f"{where}: pair {i} is {len(ids)} tokens, longer than data.max_len="
                            f"{max_len}; raise data.max_len (up to the model's maximum)")
        out.append(pipeline.Tokenized(ids, len(s), prefix_id))
    return out


def target_logits(model: base.Model, params: dict, batch: dict[str, jax.Array],
                  dropout_rng: jax.Array | None = None,
                  layer_on: jax.Array | None = None, with_prefix: bool = True) -> jax.Array:
    """Logits `[B, W, V]` at the target positions of a batch, the prefix at every layer (or,
    with `layer_on` `[L]` bool, only where it is True: `python -m prefix_jax.layer_influence`;
    or nowhere, without `with_prefix`: the untuned base).

    The LM head (a d x vocab matmul per position, a fifth of SmolLM2's FLOPs) runs only where
    the loss reads it, not on the source and padding positions.
    """
    kv, options = None, prefix.DecodeOptions()
    if with_prefix:
        kv = prefix.select(model.prefix_kv(params, dropout_rng), batch.get("prefix_ids"))
        options = model.options
    # an infix is seen from the last source token (target_index[:, 0]: it predicts the target) on
    target_start = batch["target_index"][:, 0] if options.infix else None
    mask, key_mask = masks.training(options, batch["segment_ids"], prefix.length(kv),
                                    model.prefix.n_layers, target_start, layer_on)
    hidden, _ = model.base.apply({"params": params["base"]}, batch["tokens"],
                                 batch["positions"] + options.position_offset, mask,
                                 prefix=kv, return_hidden=True, key_mask=key_mask)
    hidden = jnp.take_along_axis(hidden, batch["target_index"][..., None], axis=1)
    return model.base.apply({"params": params["base"]}, hidden, method="logits")


def target_loss_sum(model: base.Model, params: dict, batch: dict[str, jax.Array],
                    dropout_rng: jax.Array | None = None,
                    layer_on: jax.Array | None = None, with_prefix: bool = True
                    ) -> tuple[jax.Array, jax.Array]:
    """(sum of cross-entropies over the batch's target tokens, number of target tokens)."""
    logits = target_logits(model, params, batch, dropout_rng, layer_on, with_prefix)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch["target_tokens"])
    weight = batch["target_weight"]
    return (ce * weight).sum(), weight.sum()


def lm_loss(trainable, frozen, batch: dict[str, jax.Array], model: base.Model,
            dropout_rng: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over target tokens; differentiated w.r.t. `trainable` only."""
    total, count = target_loss_sum(model, partition.merge(trainable, frozen), batch,
                                   dropout_rng)
    return total / jnp.maximum(count, 1.0)


class TextToTextTask(base.Task):
    """Source -> target text; one prefix per data directory (`configs.task_dirs`)."""

    unit = "examples"  # what a source is called in printed summaries ("MRs")
    split_file: ClassVar[dict[str, str]] = {}  # split -> file name (for error messages)

    def __init__(self, config: ml_collections.ConfigDict, training: bool = True):
        super().__init__(config)
        self.dirs = configs.task_dirs(config)
        # read now, so that a missing or malformed file stops the run before the model loads
        self.train_pairs = ([self.read_pairs(d, "train") for d in self.dirs] if training
                            else None)

    @abc.abstractmethod
    def read_pairs(self, data_dir: str, split: str) -> list[Pair]:
        """Every (source, reference) row of a split, in file order."""

    @abc.abstractmethod
    def read_references(self, data_dir: str, split: str) -> tuple[list[str], list[list[str]]]:
        """Unique sources of a split, in file order, with all references of each."""

    @abc.abstractmethod
    def report_scores(self, predictions: list[str], references: list[list[str]]
                      ) -> dict[str, float]:
        """The task's reportable metrics (the numbers papers compare)."""

    report_metric_names: tuple[str, ...] = ("bleu",)

    def prompt(self, source: str) -> str:
        """The text a source's target follows, in training and in decoding alike."""
        return format_source(source)

    def check_can_report(self) -> None:
        """Fail now, not after hours of decoding, if a reportable metric cannot run here."""

    def train_examples(self, tokenizer) -> list[pipeline.Tokenized]:
        if self.train_pairs is None:
            raise ValueError(f"task {self.name!r} was built with training=False")
        config = self.config
        out = []
        for task, (pairs, data_dir) in enumerate(zip(self.train_pairs, self.dirs)):
            if config.data.train_examples:
                # the subset has its own seed, so that low-data runs can vary it apart from
                # the init/order seed (5 subsamples x 2 seeds); absent from older configs
                subsample_seed = config.data.get("subsample_seed", 0)
                order = np.random.default_rng(subsample_seed).permutation(len(pairs))
                pairs = [pairs[i] for i in order[:config.data.train_examples]]
            out += tokenize_pairs(pairs, tokenizer, config.data.max_len,
                                  os.path.join(data_dir, self.split_file.get("train", "")),
                                  task, prompt=self.prompt)
        return out

    def collate(self, examples, bucket_multiple, pad_id, widths=None):
        return pipeline.collate(examples, bucket_multiple, pad_id, widths)

    def widths(self, examples, bucket_multiple):
        return pipeline.padded_lengths(examples, bucket_multiple)

    def loss(self, trainable, frozen, batch, model, dropout_rng=None):
        return lm_loss(trainable, frozen, batch, model, dropout_rng)

    def evaluator(self, name: str, spec: ml_collections.ConfigDict) -> base.Evaluator:
        from prefix_jax.tasks import evaluators

        if spec.type == "generation":
            if spec.phase == "end":
                return evaluators.ReportGeneration(self, name, spec)
            return evaluators.DevGeneration(self, name, spec)
        if spec.type == "loss":
            return evaluators.TeacherForcedLoss(self, name, spec)
        raise base.unsupported(self, name, spec, ("generation", "loss"))
