"""DART v1.1.1 (Nan et al. 2021): sets of (subject, relation, object) triples -> text.

Files (see ../shared/data/dart/SOURCE.md): `dart-v1.1.1-full-dev.json` (a list of
{tripleset, annotations: [{source, text}]}) and `dart-v1.1.1-full-test.xml` (WebNLG-style XML,
`<entry>` with `<mtriple>subj | REL | obj</mtriple>` and `<lex>` references). No train split
ships here, so DART is an evaluation task only: its dev and test evaluators (generation + BLEU,
teacher-forced loss) run on a prefix trained on another task (`evaluate --task=dart`).
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

from prefix_jax.errors import UserError
from prefix_jax.tasks import metrics, text_file
from prefix_jax.tasks.text_to_text import Pair, TextToTextTask

SPLIT_FILES = {"dev": "dart-v1.1.1-full-dev.json", "test": "dart-v1.1.1-full-test.xml"}
GET_DATA = "put the DART v1.1.1 release there (see ../shared/data/dart/SOURCE.md)"


def format_triples(triples: list[tuple[str, str, str]]) -> str:
    """One line: `subj : rel : obj | subj : rel : obj`."""
    return " | ".join(" : ".join(t) for t in triples)


def read_split(data_dir: str, split: str) -> tuple[list[str], list[list[str]]]:
    """Linearized triple sets and all references of each, in file order."""
    path = os.path.join(data_dir, SPLIT_FILES[split])
    if not os.path.isfile(path):
        raise UserError(f"{path}: DART {split} file not found; {GET_DATA}")
    sources, references = [], []
    try:
        text = text_file.read_text(path)
        if path.endswith(".json"):
            for entry in json.loads(text):
                sources.append(format_triples([tuple(t) for t in entry["tripleset"]]))
                references.append([a["text"].strip() for a in entry["annotations"]])
        else:
            for entry in ET.fromstring(text.encode("utf-8")).iter("entry"):
                triples = [tuple(part.strip() for part in m.text.split("|"))
                           for m in entry.iter("mtriple")]
                sources.append(format_triples(triples))
                references.append([lex.text.strip() for lex in entry.iter("lex") if lex.text])
    except (json.JSONDecodeError, ET.ParseError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is not a DART v1.1.1 {split} file ({type(e).__name__}: {e}); "
                        f"{GET_DATA}") from e
    if not sources:
        raise UserError(f"{path}: no entries; {GET_DATA}")
    return sources, references


class Dart(TextToTextTask):
    name = "dart"
    unit = "triple sets"
    split_file = SPLIT_FILES

    def read_pairs(self, data_dir: str, split: str) -> list[Pair]:
        if split not in SPLIT_FILES:
            raise UserError(f"DART has no {split} split here (only {sorted(SPLIT_FILES)}): it "
                            "is an evaluation task; train on E2E and evaluate with --task=dart")
        sources, references = read_split(data_dir, split)
        return [Pair(s, r) for s, refs in zip(sources, references) for r in refs]

    def read_references(self, data_dir: str, split: str) -> tuple[list[str], list[list[str]]]:
        return read_split(data_dir, split)

    def report_scores(self, predictions, references) -> dict[str, float]:
        return {"bleu": metrics.corpus_bleu(predictions, references)}
