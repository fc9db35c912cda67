"""What the train loop needs to know about a task: `get(config)` -> a `Task`.

train.py is one loop for every task; the task supplies its data (read and checked before the
workdir is touched), its tokenized training examples, how they are collated into batches, the
loss, and the dev evaluation. `loss_fn` / `evaluate` of None mean train.py's own next-token loss
on target tokens and generation evaluation (the E2E path, unchanged).

- `e2e`: E2E NLG (and more E2E-format dirs in `data.extra_dirs`, one prefix per task).
- `sst2`: SST-2 sentiment classification with a BERT encoder's head; dev accuracy and loss.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from prefix_jax import configs, prefix
from prefix_jax.data import pipeline
from prefix_jax.errors import UserError
from prefix_jax.tasks import e2e, sst2
from prefix_jax.training import partition

TASKS = ("e2e", "sst2")


@dataclasses.dataclass
class Task:
    name: str
    train_examples: Callable[[Any], list]  # tokenizer -> examples with `tokens`
    collate: Callable = pipeline.collate  # (examples, bucket_multiple, pad_id, widths) -> batch
    widths: Callable = pipeline.padded_lengths  # (examples, bucket_multiple) -> pad widths
    loss_fn: Callable | None = None  # (trainable, frozen, batch, model, prefix_dropout_rng)
    # -> loss; None: the LM loss
    evaluate: Callable | None = None  # (model, params, tokenizer, with_prefix) -> scores
    dev_sets: list = dataclasses.field(default_factory=list)  # E2E: (sources, refs) per task
    model_kind: str = "llama"  # 'llama' (decoder) or 'bert' (encoder with a head)


def get(config: ml_collections.ConfigDict) -> Task:
    """The task named by `config.data.task`, its files read and checked."""
    if config.data.task == "e2e":
        return _e2e(config)
    if config.data.task == "sst2":
        return _sst2(config)
    raise UserError(f"data.task={config.data.task!r} is not one of {TASKS}")


def check_model(task: Task, loaded) -> None:
    """The loaded base fits the task (a classifier needs an encoder with a head, and back)."""
    kind = "bert" if loaded.config.capabilities.kind == "encoder" else "llama"
    if kind != task.model_kind:
        raise UserError(f"data.task={task.name!r} needs a {task.model_kind} model but "
                        f"model.path={loaded.source} is a {kind}; use "
                        + ("model.path=minilm (or a BERT directory)" if task.model_kind == "bert"
                           else "a decoder such as model.path=smollm2"))


# ---- E2E: the functions stay in data/e2e.py, data/pipeline.py and train.py; this wraps them.

def _e2e(config: ml_collections.ConfigDict) -> Task:
    dirs = configs.task_dirs(config)
    train_pairs = [e2e.read_pairs(d, "train") for d in dirs]
    dev_sets = [e2e.group_references(e2e.read_pairs(d, "dev")) for d in dirs]
    if config.eval.test_at_end:
        from prefix_jax.serving import evaluation

        evaluation.check_can_score("e2e")
        e2e.read_pairs(config.data.dir, "test")  # a missing test file fails now, not at the end
    n = config.eval.num_examples
    dev_sets = [(s[:n], r[:n]) for s, r in dev_sets]

    def train_examples(tokenizer) -> list[pipeline.Tokenized]:
        out = []
        for task, (pairs, data_dir) in enumerate(zip(train_pairs, dirs)):
            if config.data.train_examples:
                # the subset has its own seed, so that low-data runs can vary it apart from
                # the init/order seed (5 subsamples x 2 seeds); absent from older configs
                subsample_seed = config.data.get("subsample_seed", 0)
                order = np.random.default_rng(subsample_seed).permutation(len(pairs))
                pairs = [pairs[i] for i in order[:config.data.train_examples]]
            out += pipeline.tokenize_pairs(pairs, tokenizer, config.data.max_len,
                                           os.path.join(data_dir, "trainset.csv"), task)
        return out

    return Task("e2e", train_examples, dev_sets=dev_sets)


# ---- SST-2: classification through the encoder's head.

def _sst2(config: ml_collections.ConfigDict) -> Task:
    if config.eval.test_at_end:
        raise UserError("eval.test_at_end=True: SST-2's test split has no labels; set it False "
                        "(the dev accuracy is the reported number)")
    if configs.task_dirs(config)[1:]:
        raise UserError("data.extra_dirs is for multi-task E2E runs; leave it empty for sst2")
    if config.prefix.get("placement", "prefix") != "prefix":
        raise UserError("prefix.placement='infix' needs a source and a target; a classifier "
                        "reads the whole sentence: use prefix.placement='prefix'")
    train = sst2.read(config.data.dir, "train")
    dev = sst2.read(config.data.dir, "dev")[:config.eval.num_examples]
    if config.data.train_examples:
        order = np.random.default_rng(config.data.get("subsample_seed", 0)).permutation(
            len(train))
        train = [train[i] for i in order[:config.data.train_examples]]
    max_len = config.data.max_len
    forward = {}  # the jitted dev forward pass, compiled once per run (per batch width)

    def evaluate(model, params, tokenizer, with_prefix: bool) -> dict[str, float]:
        if "fn" not in forward:
            forward["fn"] = jax.jit(functools.partial(classify, model), static_argnums=(2,))
        from prefix_jax.models import pad_id

        started = time.perf_counter()
        examples = sst2.tokenize(dev, tokenizer, max_len)
        order = np.argsort([len(e.tokens) for e in examples], kind="stable")  # less padding
        size = config.eval.batch_size
        correct, loss_sum = 0, 0.0
        for start in range(0, len(order), size):
            rows = [examples[i] for i in order[start:start + size]]
            batch = sst2.collate(rows, config.data.bucket_multiple, pad_id(tokenizer))
            logits = np.asarray(forward["fn"](params, batch, with_prefix))
            labels = batch["labels"]
            correct += int((logits.argmax(-1) == labels).sum())
            log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            loss_sum += float(-log_probs[np.arange(len(labels)), labels].sum())
        scores = {"accuracy": 100.0 * correct / max(len(examples), 1),
                  "loss": loss_sum / max(len(examples), 1)}
        print(f"\n== dev{'' if with_prefix else ' (untuned)'}: accuracy {scores['accuracy']:.2f}%"
              f"  loss {scores['loss']:.4f} on {len(examples)} sentences "
              f"({time.perf_counter() - started:.0f} s) ==")
        return scores

    return Task("sst2", lambda tokenizer: sst2.tokenize(train, tokenizer, max_len),
                collate=sst2.collate, widths=sst2.padded_width, loss_fn=classification_loss,
                evaluate=evaluate if dev else None, model_kind="bert")


def classify(model, params: dict, batch: dict[str, jax.Array], with_prefix: bool = True,
             dropout_rng: jax.Array | None = None,
             prefix_dropout_rng: jax.Array | None = None) -> jax.Array:
    """Class logits `[B, num_labels]` of a batch; the prefix in its layers when `with_prefix`.
    Dropout (the head's, the prefix's) runs only when its rng is given."""
    from prefix_jax.models.bert import Bert
    from prefix_jax.prefix import masks

    kv, options = None, prefix.DecodeOptions()
    if with_prefix:
        kv = prefix.select(model.prefix_kv(params, prefix_dropout_rng), batch.get("prefix_ids"))
        options = model.options
    offset = options.position_offset
    base = {"params": params["base"]}
    mask, key_mask = masks.encoder(options, batch["segment_ids"], prefix.length(kv),
                                   model.prefix.n_layers)
    hidden = model.base.apply(base, batch["tokens"], batch["positions"] + offset, mask,
                              prefix=kv, key_mask=key_mask)
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    return model.base.apply(base, hidden, batch["segment_ids"], dropout_rng is None,
                            method=Bert.classify, rngs=rngs)


def classification_loss(trainable, frozen, batch: dict[str, jax.Array], model,
                        prefix_dropout_rng: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of the head's logits; the head's dropout seeded by the batch, the
    prefix's (`prefix.dropout`) by the step (train.train_step)."""
    rng = jax.random.fold_in(jax.random.key(0), batch["dropout_seed"][0])
    logits = classify(model, partition.merge(trainable, frozen), batch, dropout_rng=rng,
                      prefix_dropout_rng=prefix_dropout_rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
