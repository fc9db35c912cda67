"""E2E NLG (Novikova et al. 2017): restaurant meaning representations -> descriptions.

Files (the official release, see ../shared/data/e2e/SOURCE.md): `trainset.csv`, `devset.csv`,
`testset_w_refs.csv`, each with header `mr,ref`, one reference per row; rows sharing an MR are
its references.
"""

from __future__ import annotations

import csv
import io
import os
import shutil

from prefix_jax.errors import UserError
from prefix_jax.tasks import metrics, text_file
from prefix_jax.tasks.text_to_text import Pair, TextToTextTask, format_source, group_references

__all__ = ["E2E", "Pair", "format_source", "group_references", "read_pairs"]

SPLIT_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
GET_DATA = "run scripts/get_data.sh or set --config.data.dir to a copy of the E2E release"


def read_pairs(data_dir: str, split: str) -> list[Pair]:
    """All (MR, reference) rows of a split, in file order; bad rows are errors with file:line."""
    if not os.path.isdir(data_dir):
        raise UserError(f"data.dir={data_dir}: E2E data directory not found; {GET_DATA}")
    path = os.path.join(data_dir, SPLIT_FILES[split])
    if not os.path.isfile(path):
        raise UserError(f"{path}: E2E {split} file not found; {GET_DATA}")
    pairs = []
    with io.StringIO(text_file.read_text(path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["mr", "ref"]:
            raise UserError(f"{path}:1: expected the header 'mr,ref', got {header!r}; "
                            f"is this an E2E file? {GET_DATA}")
        for row in reader:
            line = reader.line_num
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise UserError(f"{path}:{line}: expected two non-empty fields 'mr,ref', "
                                f"got {row!r}; fix or remove that row")
            pairs.append(Pair(row[0].strip(), row[1].strip()))
    if not pairs:
        raise UserError(f"{path}: no data rows; {GET_DATA}")
    return pairs


class E2E(TextToTextTask):
    """E2E NLG (and more E2E-format dirs in `data.extra_dirs`, one prefix per task)."""

    name = "e2e"
    unit = "MRs"
    split_file = SPLIT_FILES
    report_metric_names = ("bleu", "nist", "meteor", "rouge_l", "cider")

    def read_pairs(self, data_dir: str, split: str) -> list[Pair]:
        return read_pairs(data_dir, split)

    def read_references(self, data_dir: str, split: str) -> tuple[list[str], list[list[str]]]:
        return group_references(read_pairs(data_dir, split))

    def report_scores(self, predictions, references) -> dict[str, float]:
        return metrics.e2e_scores(predictions, references)

    def check_can_report(self) -> None:
        if shutil.which("java") is None:  # METEOR: say so before hours of decoding, not after
            raise UserError("E2E evaluation needs Java on the PATH for METEOR 1.5 "
                            "(pycocoevalcap); install a JRE, e.g. apt-get install "
                            "default-jre-headless")
