"""Tokenized examples -> loss-masked, length-bucketed batches, through a grain MapDataset.

Tasks tokenize their own formats (tasks/); this module knows none of them.

Batch `i` of the run is a pure function of (seed, i): each epoch is a seeded permutation, cut
into chunks of `batch_size * BUCKET_CHUNKS` sequences, sorted by length within a chunk (so a
batch holds similar lengths and little padding), batched, and the batches shuffled. The grain
iterator's state is just the next batch index, so a checkpoint restores the exact data order.

Every batch is padded to a multiple of `bucket_multiple` tokens, which bounds the number of
shapes the train step is compiled for.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from prefix_jax.errors import UserError

BUCKET_CHUNKS = 50  # batches per sorting chunk: more = less padding, less randomness


@dataclasses.dataclass(frozen=True)
class Tokenized:
    tokens: np.ndarray  # int32 [n], source then target (target ends with EOS)
    n_source: int  # first n_source tokens are the prompt (no loss)
    prefix_id: int = 0  # which task's prefix the row trains (multi-task runs)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_lengths(examples: list[Tokenized], bucket_multiple: int) -> tuple[int, int]:
    """(sequence width, target width) that a batch of `examples` is padded to."""
    seq = round_up(max(len(e.tokens) - 1 for e in examples), bucket_multiple)
    target = round_up(max(len(e.tokens) - e.n_source for e in examples), bucket_multiple)
    return seq, target


def collate(examples: list[Tokenized], bucket_multiple: int, pad_id: int,
            widths: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Right-padded next-token batch, inputs = seq[:-1], with the loss read at target positions.

    `tokens`, `positions`, `segment_ids` are `[B, T]`; `segment_ids` is 1 on real tokens and 0
    on padding (packing would number segments 1, 2, ...); `prefix_ids` `[B]` is each row's
    task (multi-task runs train one prefix per task). The loss needs logits only where the
    next token is target text (incl. EOS): `target_index` `[B, W]` holds those positions,
    `target_tokens` the tokens to predict there, `target_weight` 1 for real entries, so the LM
    head runs on W instead of T positions. `widths` (default: buckets of this batch) fixes
    (T, W), so every process pads its rows of a global batch alike.
    """
    t, w = widths or padded_lengths(examples, bucket_multiple)
    b = len(examples)
    batch = dict(tokens=np.full((b, t), pad_id, np.int32),
                 positions=np.zeros((b, t), np.int32), segment_ids=np.zeros((b, t), np.int32),
                 target_index=np.zeros((b, w), np.int32),
                 target_tokens=np.full((b, w), pad_id, np.int32),
                 target_weight=np.zeros((b, w), np.float32),
                 prefix_ids=np.zeros((b,), np.int32))
    for row, e in enumerate(examples):
        n = len(e.tokens) - 1
        batch["tokens"][row, :n] = e.tokens[:-1]
        batch["positions"][row, :n] = np.arange(n)
        batch["segment_ids"][row, :n] = 1
        k = n - (e.n_source - 1)  # positions n_source-1 .. n-1 predict the target tokens
        batch["target_index"][row, :k] = np.arange(e.n_source - 1, n)
        batch["target_tokens"][row, :k] = e.tokens[e.n_source:]
        batch["target_weight"][row, :k] = 1.0
        batch["prefix_ids"][row] = e.prefix_id
    return batch


class BatchPlan:
    """Which examples form global batch `i` (deterministic in seed and i)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int):
        if len(lengths) < batch_size:
            raise UserError(f"{len(lengths)} training examples is fewer than train.batch_size="
                            f"{batch_size}; lower the batch size or add data")
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.batches_per_epoch = len(lengths) // batch_size  # the remainder is dropped
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch(self, epoch: int) -> np.ndarray:
        """`[batches_per_epoch, batch_size]` example indices of one epoch (the last is cached)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._make_epoch(epoch))
        return self._cached[1]

    def _make_epoch(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        chunk = self.batch_size * BUCKET_CHUNKS
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            order[start:start + chunk] = part[np.argsort(self.lengths[part], kind="stable")]
        n = self.batches_per_epoch * self.batch_size
        batches = order[:n].reshape(self.batches_per_epoch, self.batch_size)
        return batches[rng.permutation(len(batches))]

    def __call__(self, i: int) -> np.ndarray:
        return self.epoch(i // self.batches_per_epoch)[i % self.batches_per_epoch]


def train_iterator(examples: list[Tokenized], batch_size: int, seed: int, bucket_multiple: int,
                   pad_id: int, num_batches: int, process_index: int = 0,
                   process_count: int = 1, collate_fn=collate, widths_fn=padded_lengths
                   ) -> grain.DatasetIterator:
    """A checkpointable iterator over `num_batches` batches of this process's rows.

    Each process takes its contiguous slice of every global batch, so the union over processes
    is the same global batch whatever the number of hosts. Other tasks' examples (anything with
    `tokens`) bring their own `collate_fn` and `widths_fn` (see `collate`, `padded_lengths`).
    """
    if batch_size % process_count:
        raise UserError(f"train.batch_size={batch_size} is not divisible by the "
                        f"{process_count} processes; use a multiple of {process_count}")
    plan = BatchPlan(np.asarray([len(e.tokens) for e in examples]), batch_size, seed)
    per_process = batch_size // process_count
    rows = slice(process_index * per_process, (process_index + 1) * per_process)

    def make_batch(i: int) -> dict[str, np.ndarray]:
        ids = plan(int(i))
        widths = widths_fn([examples[j] for j in ids], bucket_multiple)
        return collate_fn([examples[j] for j in ids[rows]], bucket_multiple, pad_id, widths)

    dataset = grain.MapDataset.range(num_batches).map(make_batch)
    return iter(dataset.to_iter_dataset())
