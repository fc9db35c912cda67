"""SST-2 (GLUE): movie-review sentences -> sentiment 0 (negative) / 1 (positive).

Files (GLUE's release, see ../shared/data/sst2/SOURCE.md): `train.tsv` and `dev.tsv` with header
`sentence<TAB>label`; `test.tsv` has no labels and is not read.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import io
import os
import time
import zlib

import jax
import ml_collections
import numpy as np
import optax

from prefix_jax import configs, prefix
from prefix_jax.data.pipeline import round_up
from prefix_jax.errors import UserError
from prefix_jax.tasks import base, text_file
from prefix_jax.training import partition

SPLIT_FILES = {"train": "train.tsv", "dev": "dev.tsv"}
GET_DATA = "run scripts/get_data.sh or set --config.data.dir to a copy of GLUE's SST-2"
LABELS = (0, 1)


@dataclasses.dataclass(frozen=True)
class Example:
    sentence: str
    label: int


def read(data_dir: str, split: str) -> list[Example]:
    """All rows of a split in file order; a malformed row is an error naming file:line."""
    if not os.path.isdir(data_dir):
        raise UserError(f"data.dir={data_dir}: SST-2 data directory not found; {GET_DATA}")
    path = os.path.join(data_dir, SPLIT_FILES[split])
    if not os.path.isfile(path):
        raise UserError(f"{path}: SST-2 {split} file not found; {GET_DATA}")
    examples = []
    with io.StringIO(text_file.read_text(path), newline=None) as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["sentence", "label"]:
            raise UserError(f"{path}:1: header is {header!r}, expected 'sentence<TAB>label' "
                            "(GLUE SST-2 format)")
        for line_no, line in enumerate(f, start=2):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2:
                raise UserError(f"{path}:{line_no}: expected 2 tab-separated fields "
                                f"(sentence, label), got {len(fields)}; fix or remove the row")
            sentence, label = fields
            if label.strip() not in ("0", "1"):
                raise UserError(f"{path}:{line_no}: label {label!r} is not 0 or 1; fix the row")
            if not sentence.strip():
                raise UserError(f"{path}:{line_no}: empty sentence; fix or remove the row")
            examples.append(Example(sentence.strip(), int(label)))
    if not examples:
        raise UserError(f"{path}: no examples; {GET_DATA}")
    return examples


@dataclasses.dataclass(frozen=True)
class Tokenized:
    tokens: np.ndarray  # int32 [n], with the tokenizer's special tokens ([CLS] ... [SEP])
    label: int
    index: int  # row in the split (seeds the batch's dropout)


def tokenize(examples: list[Example], tokenizer, max_len: int) -> list[Tokenized]:
    """Sentences longer than `max_len` tokens are truncated (the tokenizer keeps [SEP])."""
    ids = tokenizer([e.sentence for e in examples], truncation=True, max_length=max_len).input_ids
    return [Tokenized(np.asarray(t, np.int32), e.label, i)
            for i, (t, e) in enumerate(zip(ids, examples))]


def padded_width(examples: list[Tokenized], bucket_multiple: int) -> tuple[int]:
    """(sequence width,) a batch of `examples` is padded to (pipeline.train_iterator's widths)."""
    return (round_up(max(len(e.tokens) for e in examples), bucket_multiple),)


def collate(examples: list[Tokenized], bucket_multiple: int, pad_id: int,
            widths: tuple[int] | None = None) -> dict[str, np.ndarray]:
    """Right-padded batch: `tokens`, `positions`, `segment_ids` (1 real, 0 padding) `[B, T]`,
    `labels` `[B]`, and `dropout_seed` `[B]` (one value per batch, from its rows, so dropout
    differs between batches and a restored run repeats it exactly)."""
    (t,) = widths or padded_width(examples, bucket_multiple)
    b = len(examples)
    batch = dict(tokens=np.full((b, t), pad_id, np.int32), positions=np.zeros((b, t), np.int32),
                 segment_ids=np.zeros((b, t), np.int32), labels=np.zeros((b,), np.int32))
    for row, e in enumerate(examples):
        n = len(e.tokens)
        batch["tokens"][row, :n] = e.tokens
        batch["positions"][row, :n] = np.arange(n)
        batch["segment_ids"][row, :n] = 1
        batch["labels"][row] = e.label
    seed = zlib.crc32(np.asarray([e.index for e in examples], np.int64).tobytes()) & 0x7FFFFFFF
    batch["dropout_seed"] = np.full((b,), seed, np.int32)
    return batch


def classify(model: base.Model, params: dict, batch: dict[str, jax.Array],
             with_prefix: bool = True, dropout_rng: jax.Array | None = None,
             prefix_dropout_rng: jax.Array | None = None) -> jax.Array:
    """Class logits `[B, num_labels]` of a batch; the prefix in its layers when `with_prefix`.
    Dropout (the head's, the prefix's) runs only when its rng is given."""
    from prefix_jax.prefix import masks

    kv, options = None, prefix.DecodeOptions()
    if with_prefix:
        kv = prefix.select(model.prefix_kv(params, prefix_dropout_rng), batch.get("prefix_ids"))
        options = model.options
    base_params = {"params": params["base"]}
    mask, key_mask = masks.encoder(options, batch["segment_ids"], prefix.length(kv),
                                   model.prefix.n_layers)
    hidden = model.base.apply(base_params, batch["tokens"],
                              batch["positions"] + options.position_offset, mask,
                              prefix=kv, key_mask=key_mask)
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    return model.base.apply(base_params, hidden, batch["segment_ids"], dropout_rng is None,
                            method="classify", rngs=rngs)


def classification_loss(trainable, frozen, batch: dict[str, jax.Array], model: base.Model,
                        prefix_dropout_rng: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of the head's logits; the head's dropout seeded by the batch, the
    prefix's (`prefix.dropout`) by the step (train.train_step)."""
    rng = jax.random.fold_in(jax.random.key(0), batch["dropout_seed"][0])
    logits = classify(model, partition.merge(trainable, frozen), batch, dropout_rng=rng,
                      prefix_dropout_rng=prefix_dropout_rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


class Accuracy:
    """Dev accuracy and mean cross-entropy of the classifier (type 'accuracy')."""

    metric_names = ("accuracy", "loss")

    def __init__(self, task: Classification, name: str, spec):
        self.task, self.name, self.spec = task, name, spec
        dev = task.read_split(spec.split)
        self.examples = dev[:spec.limit] if spec.limit else dev
        self.description = task.name
        self._forward = {}  # the jitted forward pass, compiled once per run (per batch width)

    def __call__(self, model: base.Model, params: dict, tokenizer, ctx: base.EvalContext
                 ) -> dict[str, float]:
        from prefix_jax.models import pad_id

        if "fn" not in self._forward:
            self._forward["fn"] = jax.jit(functools.partial(classify, model), static_argnums=(2,))
        config = self.task.config
        started = time.perf_counter()
        examples = tokenize(self.examples, tokenizer, config.data.max_len)
        order = np.argsort([len(e.tokens) for e in examples], kind="stable")  # less padding
        size = self.spec.batch_size
        correct, loss_sum = 0, 0.0
        for start in range(0, len(order), size):
            rows = [examples[i] for i in order[start:start + size]]
            batch = collate(rows, config.data.bucket_multiple, pad_id(tokenizer))
            logits = np.asarray(self._forward["fn"](params, batch, ctx.with_prefix))
            labels = batch["labels"]
            correct += int((logits.argmax(-1) == labels).sum())
            log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            loss_sum += float(-log_probs[np.arange(len(labels)), labels].sum())
        scores = {"accuracy": 100.0 * correct / max(len(examples), 1),
                  "loss": loss_sum / max(len(examples), 1)}
        print(f"\n== dev{'' if ctx.with_prefix else ' (untuned)'}: accuracy "
              f"{scores['accuracy']:.2f}%  loss {scores['loss']:.4f} on {len(examples)} "
              f"sentences ({time.perf_counter() - started:.0f} s) ==")
        return scores


def subsample(config: ml_collections.ConfigDict, rows: list) -> list:
    """The first `data.train_examples` rows in a shuffled order (all when it is 0); the order
    has its own seed (`data.subsample_seed`), apart from the init/order seed."""
    if not config.data.train_examples:
        return rows
    order = np.random.default_rng(config.data.get("subsample_seed", 0)).permutation(len(rows))
    return [rows[i] for i in order[:config.data.train_examples]]


class Classification(base.Task):
    """A sentence -> label task on an encoder's head: subclasses read their splits into
    `Example`s (`read_split`) and set `train_rows`; tokenizing, batching, the loss and the
    accuracy evaluator are shared."""

    model_kind = "encoder"
    train_rows: list[Example]

    @abc.abstractmethod
    def read_split(self, split: str) -> list[Example]:
        """Every example of `split` ('train', 'dev' or 'test'), labels as class indices."""

    def train_examples(self, tokenizer) -> list[Tokenized]:
        return tokenize(self.train_rows, tokenizer, self.config.data.max_len)

    def collate(self, examples, bucket_multiple, pad_id, widths=None):
        return collate(examples, bucket_multiple, pad_id, widths)

    def widths(self, examples, bucket_multiple):
        return padded_width(examples, bucket_multiple)

    def loss(self, trainable, frozen, batch, model, dropout_rng=None):
        return classification_loss(trainable, frozen, batch, model, dropout_rng)

    def evaluator(self, name: str, spec: ml_collections.ConfigDict) -> base.Evaluator:
        if spec.type == "accuracy":
            return Accuracy(self, name, spec)
        raise base.unsupported(self, name, spec, ("accuracy",))


def check_single_prefix(config: ml_collections.ConfigDict, task: str) -> None:
    """A classifier has one data dir and reads whole sentences: no multi-task, no infix."""
    if configs.task_dirs(config)[1:]:
        raise UserError(f"data.extra_dirs is for multi-task E2E runs; leave it empty for {task}")
    if config.prefix.get("placement", "prefix") != "prefix":
        raise UserError("prefix.placement='infix' needs a source and a target; a "
                        "classifier reads the whole sentence: use prefix.placement='prefix'")


class SST2(Classification):
    """SST-2 sentiment classification with a BERT encoder's head; dev accuracy and loss."""

    name = "sst2"

    def __init__(self, config: ml_collections.ConfigDict, training: bool = True):
        super().__init__(config)
        if config.eval.test_at_end:
            raise UserError("eval.test_at_end=True: SST-2's test split has no labels; set it "
                            "False (the dev accuracy is the reported number)")
        check_single_prefix(config, "sst2")
        self.train_rows = subsample(config, read(config.data.dir, "train")) if training else []

    def read_split(self, split: str) -> list[Example]:
        return read(self.config.data.dir, split)
