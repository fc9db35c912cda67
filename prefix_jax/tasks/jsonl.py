"""Your own data as JSON Lines files: one JSON object per line, the fields named in the config.

Files: `data.train_file`, `data.dev_file`, `data.test_file`, read from `data.dir` when relative
('' = the current directory); an empty file name means the run has no such split. Blank lines
are skipped; any other bad line stops the run before the model loads with one error naming
file:line (invalid JSON, not an object, a missing or non-string field, an unknown label).

Two tasks (configs.jsonl_data / configs.jsonl_classification_data build their `data` sections):

- `jsonl`, text-to-text on a decoder: `data.source_field` -> `data.target_field`. The source is
  put into `data.prompt` (a template with one `{source}`, e.g. "{source}\\nAnswer:"); the target
  follows the prompt after one space, then EOS, exactly as E2E's. Several references per
  source, two ways: rows with the same source are its references (as in E2E's CSV), and a
  target field may be a list of strings (each one a reference, each one a training example).
  Evaluators: 'generation' with metrics 'quick' (BLEU, ROUGE-L), 'report' (BLEU, ROUGE-L,
  exact match) or named ones (`evals.<name>.metrics='exact_match'`), and 'loss'.
- `jsonl_classification`, on an encoder with a head (SST-2's pieces): `data.text_field` ->
  `data.label_field`, labels strings or integers. The label set is the train file's, sorted;
  it is recorded in `data.labels` (and the head's size in `model.num_labels` when that is 0),
  so the workdir's config.json says how to read the labels back, and a dev/test label outside
  the set is an error. Evaluator: 'accuracy' (accuracy and loss).
"""

from __future__ import annotations

import json
import os
import string

import ml_collections

from prefix_jax.errors import UserError
from prefix_jax.tasks import metrics, sst2, text_file
from prefix_jax.tasks.text_to_text import Pair, TextToTextTask, group_references

SPLITS = ("train", "dev", "test")
FORMAT = "one JSON object per line"


def split_path(config: ml_collections.ConfigDict, data_dir: str, split: str) -> str:
    """The file of `split` (its `data.<split>_file`, relative to `data_dir`); an empty name is
    an error naming the field."""
    name = config.data.get(f"{split}_file", "")
    if not name:
        raise UserError(f"data.{split}_file is empty: this run has no {split} split; give a "
                        f"JSONL file ({FORMAT}) or drop the evaluator that reads {split}")
    return os.path.join(data_dir, name)


def read_objects(path: str, split: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSONL file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: {split} file not found (data.{split}_file, relative to "
                        f"data.dir); give the path of a JSONL file, {FORMAT}")
    rows = []
    for line_no, line in enumerate(text_file.read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{line_no}: invalid JSON ({e.msg}, column {e.colno}); "
                            f"fix the line ({FORMAT})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{line_no}: expected a JSON object, got "
                            f"{type(row).__name__} ({FORMAT})")
        rows.append((line_no, row))
    if not rows:
        raise UserError(f"{path}: no rows; a JSONL {split} file has {FORMAT}")
    return rows


def _field(path: str, line_no: int, row: dict, name: str, setting: str):
    if name not in row:
        raise UserError(f"{path}:{line_no}: no field {name!r} ({setting}); the row has "
                        f"{sorted(row)}: fix the row or set {setting}")
    return row[name]


def text_field(path: str, line_no: int, row: dict, name: str, setting: str) -> str:
    """A non-empty string field of a row, stripped."""
    value = _field(path, line_no, row, name, setting)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{path}:{line_no}: field {name!r} ({setting}) must be a non-empty "
                        f"string, got {value!r}")
    return value.strip()


def references_field(path: str, line_no: int, row: dict, name: str, setting: str) -> list[str]:
    """A target: a non-empty string, or a non-empty list of them (several references)."""
    value = _field(path, line_no, row, name, setting)
    values = value if isinstance(value, list) and value else [value]
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise UserError(f"{path}:{line_no}: field {name!r} ({setting}) must be a non-empty "
                        f"string or a list of them, got {value!r}")
    return [v.strip() for v in values]


def check_names(data: ml_collections.ConfigDict, fields: tuple[str, ...]) -> None:
    for field in fields:
        value = data.get(field)
        if not isinstance(value, str) or not value:
            raise UserError(f"data.{field}={value!r}: must be the name of a JSON field")
    for split in SPLITS:
        if not isinstance(data.get(f"{split}_file", ""), str):
            raise UserError(f"data.{split}_file={data.get(f'{split}_file')!r}: must be a path "
                            "('' = no such split)")


def check_prompt(template) -> str:
    """A prompt template with exactly one field, `{source}` (literal braces doubled)."""
    fix = "e.g. data.prompt='{source}\\nAnswer:' (write literal braces as {{ and }})"
    if not isinstance(template, str):
        raise UserError(f"data.prompt={template!r}: must be a string; {fix}")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template)
                 if name is not None]
    except ValueError as e:
        raise UserError(f"data.prompt={template!r}: {e}; {fix}") from None
    if names != ["source"]:
        raise UserError(f"data.prompt={template!r} has fields {names}; it needs exactly one, "
                        f"{{source}}; {fix}")
    return template


class JsonlTextToText(TextToTextTask):
    """Source -> target text from JSONL files, the prompt from `data.prompt`."""

    name = "jsonl"
    unit = "sources"
    report_metric_names = ("bleu", "rouge_l", "exact_match")

    def __init__(self, config: ml_collections.ConfigDict, training: bool = True):
        data = config.data
        check_names(data, ("source_field", "target_field"))
        self.template = check_prompt(data.get("prompt"))
        self.split_file = {split: data.get(f"{split}_file", "") for split in SPLITS}
        if data.get("extra_dirs", "") and any(map(os.path.isabs, self.split_file.values())):
            raise UserError("data.extra_dirs with absolute data.*_file paths would read the "
                            "same files for every task; give file names relative to each dir")
        super().__init__(config, training=training)

    def prompt(self, source: str) -> str:
        return self.template.format(source=source)

    def read_pairs(self, data_dir: str, split: str) -> list[Pair]:
        data = self.config.data
        path = split_path(self.config, data_dir, split)
        pairs = []
        for line_no, row in read_objects(path, split):
            source = text_field(path, line_no, row, data.source_field, "data.source_field")
            targets = references_field(path, line_no, row, data.target_field,
                                       "data.target_field")
            pairs += [Pair(source, t) for t in targets]
        return pairs

    def read_references(self, data_dir: str, split: str) -> tuple[list[str], list[list[str]]]:
        return group_references(self.read_pairs(data_dir, split))

    def report_scores(self, predictions, references) -> dict[str, float]:
        return metrics.scores(self.report_metric_names, predictions, references)


def _label(path: str, line_no: int, row: dict, name: str):
    value = _field(path, line_no, row, name, "data.label_field")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise UserError(f"{path}:{line_no}: label {value!r} (field {name!r}) must be a "
                        "non-empty string or an integer")
    return value


class JsonlClassification(sst2.Classification):
    """Text -> label from JSONL files, on an encoder's classification head."""

    name = "jsonl_classification"

    def __init__(self, config: ml_collections.ConfigDict, training: bool = True):
        super().__init__(config)
        sst2.check_single_prefix(config, self.name)
        check_names(config.data, ("text_field", "label_field"))
        self.labels = tuple(config.data.get("labels") or ())
        self.train_rows = []
        if training:
            if not self.labels:
                self.labels = self._train_labels()
                config.data.labels = self.labels  # recorded in the workdir's config.json
            self._check_num_labels(config)
            self.train_rows = sst2.subsample(config, self.read_split("train"))
        elif not self.labels:
            raise UserError("data.labels is empty: a jsonl_classification run records its "
                            "label set when it trains; is this a finished run's config?")

    def _train_labels(self) -> tuple:
        """The sorted label set of the train file; one type (strings or integers) throughout."""
        path = split_path(self.config, self.config.data.dir, "train")
        found, kind = set(), None
        for line_no, row in read_objects(path, "train"):
            label = _label(path, line_no, row, self.config.data.label_field)
            if kind is not None and type(label) is not kind:
                raise UserError(f"{path}:{line_no}: label {label!r} is a "
                                f"{type(label).__name__} but earlier labels are "
                                f"{kind.__name__}s; use one type for every label")
            kind = type(label)
            found.add(label)
        if len(found) < 2:
            raise UserError(f"{path}: the train file has {len(found)} label(s) "
                            f"{sorted(found)}; a classifier needs at least 2")
        return tuple(sorted(found))

    def _check_num_labels(self, config: ml_collections.ConfigDict) -> None:
        n = len(self.labels)
        given = config.model.get("num_labels")
        if given is None:
            raise UserError("model.num_labels is missing; add it to the config (0 = the number "
                            "of labels in the train file)")
        if given == 0:
            config.model.num_labels = n  # recorded beside data.labels
        elif given != n:
            raise UserError(f"model.num_labels={given} but the label set has {n} labels "
                            f"{list(self.labels)}; set model.num_labels=0 (taken from the "
                            f"train file) or {n}")

    def read_split(self, split: str) -> list[sst2.Example]:
        data = self.config.data
        path = split_path(self.config, data.dir, split)
        index = {label: i for i, label in enumerate(self.labels)}
        examples = []
        for line_no, row in read_objects(path, split):
            text = text_field(path, line_no, row, data.text_field, "data.text_field")
            label = _label(path, line_no, row, data.label_field)
            if label not in index:
                raise UserError(f"{path}:{line_no}: label {label!r} is not in the label set "
                                f"{list(self.labels)} (data.labels, from the train file); fix "
                                "the row or add the label to the train file")
            examples.append(sst2.Example(text, index[label]))
        return examples
