"""SST-2 (GLUE): movie-review sentences -> sentiment 0 (negative) / 1 (positive).

Files (GLUE's release, see ../shared/data/sst2/SOURCE.md): `train.tsv` and `dev.tsv` with header
`sentence<TAB>label`; `test.tsv` has no labels and is not read.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np

from prefix_jax.data.pipeline import round_up
from prefix_jax.errors import UserError

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
    with open(path, encoding="utf-8") as f:
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
