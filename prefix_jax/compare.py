"""Training runs side by side: what each workdir holds, read into one record per run, and the
markdown table of the ablation (scripts/compare.py draws the figures from the same records).

A workdir holds config.json (the run's config), params.json (trainable and base parameter
counts), metrics.jsonl (`train/*` and `eval/*` scalars by step), results.json (the final
metrics, once the run has finished) and checkpoints/<step>/.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

from prefix_jax.errors import UserError

MISSING = "—"  # a cell whose run has no such value (an older or unfinished run)
# Metrics where a smaller value is better (every E2E/DART score is better when larger).
_LOWER_IS_BETTER = {"loss", "perplexity", "ter"}


@dataclasses.dataclass
class RunRecord:
    workdir: str
    label: str  # the workdir, relative to what every compared workdir has in common
    config: dict[str, Any]  # flattened: "prefix.length" -> 10
    params: dict[str, Any] | None  # params.json
    results: dict[str, Any] | None  # results.json (None: the run has not finished)
    rows: list[dict[str, float]]  # metrics.jsonl, one dict per line
    checkpoint_bytes: int | None  # the newest checkpoint step directory

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of one scalar, one per step (the last write wins: a resumed run
        logs the steps after its checkpoint again)."""
        by_step = {int(r["step"]): r[key] for r in self.rows if key in r}
        return sorted(by_step.items())

    def eval_metrics(self) -> list[str]:
        names = {k for r in self.rows for k in r if k.startswith("eval/")}
        names |= {k for k in (self.results or {}) if k.startswith("eval/")}
        return sorted(names)

    def best(self, key: str) -> float | None:
        values = [v for _, v in self.series(key)]
        final = (self.results or {}).get(key)
        if final is not None:
            values.append(final)
        if not values:
            return None
        return (min if lower_is_better(key) else max)(values)

    def final(self, key: str) -> float | None:
        if self.results is not None and key in self.results:
            return self.results[key]
        series = self.series(key)
        return series[-1][1] if series else None

    def tokens_per_sec(self) -> float | None:
        """Mean train tokens/s over the logged intervals after the first (which includes the
        step's compilation); the first alone for a run that logged once."""
        values = [v for _, v in self.series("train/tokens_per_sec")]
        values = values[1:] or values
        return sum(values) / len(values) if values else None


def lower_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in _LOWER_IS_BETTER


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_json(path: str, required: bool) -> Any:
    if not os.path.exists(path):
        if required:
            raise UserError(f"{path}: missing; is {os.path.dirname(path)} a training run's "
                            "workdir?")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); fix or remove that run") from None


def _read_metrics(path: str) -> list[dict[str, float]]:
    if not os.path.exists(path):
        return []
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or "step" not in row:
                        raise ValueError(f"line {n} has no 'step'")
                    rows.append(row)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); fix or remove that run") from None
    return rows


def checkpoint_bytes(workdir: str) -> int | None:
    """Bytes of the newest step directory under workdir/checkpoints (orbax names them by
    step; its temporary directories of unfinished saves are not steps)."""
    root = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []
    if not steps:
        return None
    total = 0
    for folder, _, files in os.walk(os.path.join(root, str(max(steps)))):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


def read_runs(workdirs: list[str]) -> list[RunRecord]:
    """One record per workdir; UserError for one that is missing or unreadable."""
    if not workdirs:
        raise UserError("no workdirs given: name the training runs to compare")
    unique = list(dict.fromkeys(os.path.normpath(w) for w in workdirs))
    for w in unique:
        if not os.path.isdir(w):
            raise UserError(f"{w}: not a directory; give training run workdirs")
    parents = [os.path.dirname(os.path.abspath(w)) for w in unique]
    common = os.path.commonpath(parents) if len(unique) > 1 else parents[0]
    records = []
    for w in unique:
        config = _read_json(os.path.join(w, "config.json"), required=True)
        if not isinstance(config, dict):
            raise UserError(f"{os.path.join(w, 'config.json')}: not a config (a JSON object)")
        records.append(RunRecord(
            workdir=w, label=os.path.relpath(os.path.abspath(w), common),
            config=flatten(config), params=_read_json(os.path.join(w, "params.json"), False),
            results=_read_json(os.path.join(w, "results.json"), False),
            rows=_read_metrics(os.path.join(w, "metrics.jsonl")),
            checkpoint_bytes=checkpoint_bytes(w)))
    return records


def differing_fields(records: list[RunRecord], ignore: str = "") -> list[str]:
    """Config paths whose value is not the same in every run (absent counts as a value), less
    those matching the regex `ignore` (e.g. fields that only differ because runs were made by
    different versions of the code)."""
    keys = sorted({k for r in records for k in r.config})
    return [k for k in keys
            if len({json.dumps(r.config.get(k, MISSING), sort_keys=True) for r in records}) > 1
            and not (ignore and re.search(ignore, k))]


def describe(record: RunRecord, fields: list[str]) -> str:
    """A run as its differing fields (`length=5, seed=1`): the legend of the figures."""
    if not fields:
        return record.label
    return ", ".join(f"{f.rsplit('.', 1)[-1]}={record.config.get(f, MISSING)}" for f in fields)


def _number(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return format(value, fmt)


def _size(n: int | None) -> str:
    if n is None:
        return MISSING
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _cell(value: Any) -> str:
    text = MISSING if value is MISSING else json.dumps(value) if not isinstance(value, str) \
        else value
    return text.replace("|", "\\|")


def table(records: list[RunRecord], ignore: str = "") -> str:
    """The markdown table: one row per run (config fields matching `ignore` left out)."""
    fields = differing_fields(records, ignore)
    metrics = sorted({m for r in records for m in r.eval_metrics()})
    tests = sorted({k for r in records for k in (r.results or {}) if k.startswith("test/")})
    header = (["run", *fields, "trainable params", "trainable %"]
              + [f"best {m}" for m in metrics] + [f"final {m}" for m in metrics] + tests
              + ["final train/loss", "train tokens/s", "checkpoint"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        params = r.params or {}
        loss = r.series("train/loss")
        cells = ([r.label, *(_cell(r.config.get(f, MISSING)) for f in fields),
                  _number(params.get("trainable"), ","),
                  _number(params.get("trainable_percent"), ".4g")]
                 + [_number(r.best(m), ".2f") for m in metrics]
                 + [_number(r.final(m), ".2f") for m in metrics]
                 + [_number((r.results or {}).get(t), ".2f") for t in tests]
                 + [_number(loss[-1][1] if loss else None, ".3f"),
                    _number(r.tokens_per_sec(), ".0f"), _size(r.checkpoint_bytes)])
        lines.append("| " + " | ".join(cells) + " |")
    unfinished = [r.label for r in records if r.results is None]
    notes = [f"{len(records)} runs; columns: the config fields that differ between them, then "
             "results. best = the best dev value over every evaluation of the run (max; min for "
             "losses), final = at the last step; train tokens/s = mean over the logged "
             "intervals after the first (which includes compilation); checkpoint = the newest "
             "step directory (trainable state only)."]
    if unfinished:
        notes.append(f"Unfinished (no results.json): {', '.join(unfinished)}.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
