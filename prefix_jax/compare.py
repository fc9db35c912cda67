r"""Compare training runs: a markdown table and matplotlib figures of an ablation.

  python -m prefix_jax.compare --workdir='runs/sweeps/e2e_smollm2/prefix.length=*' --out=docs/length
  python -m prefix_jax.compare --workdir=runs/p10 --workdir=runs/prompt --out=/tmp/cmp

--workdir is repeatable, and a quoted glob pattern names every workdir it matches (sorted).
Writes into OUT:
  table.md                        one row per run: the config fields that differ between the
                                  runs, trainable parameters and %, best and final dev metrics,
                                  train tokens/s, checkpoint size
  loss_curves.png                 train loss against step, every run
  metric_vs_prefix_length.png     best dev metrics (and final train loss) against prefix.length,
                                  one line per value of the other differing fields (only when
                                  prefix.length differs)
  metric_vs_trainable_params.png  the same against trainable parameters (log scale)
  metric_vs_train_examples.png    best dev metrics against data.train_examples: mean and 95%
                                  interval (error bars) over the replicates, one line per
                                  method (only when data.train_examples differs)
--figures picks which of these figures to write (default: all four; each still only when its
condition holds); a figure left out is not written, and one already in OUT stays as it was.
Runs that differ only in a replicate field (`seed`, `data.subsample_seed`) are replicates of
one setting: table.md then adds a grouped table, one row per setting, with n and, per metric,
mean, std (n-1) and a 95% interval (Student's t: mean +- t(0.975, n-1) std / sqrt(n)).
A workdir that is missing, has no config.json, or holds an unreadable file is an error (exit 2);
a torn last line of metrics.jsonl (a run killed mid-write) is skipped with a warning.

Each workdir is read into one record (`read_runs`) before anything is written. A workdir holds
config.json (the run's config), params.json (trainable and base parameter counts),
metrics.jsonl (`train/*` and `eval/*` scalars by step), results.json (the final metrics, once
the run has finished) and checkpoints/<step>/.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import math
import os
import re
from typing import Any

from absl import flags

from prefix_jax import cli
from prefix_jax.errors import UserError
from prefix_jax.training import workdir as workdir_io

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_multi_string(
    "workdir", None, "A training run's workdir, or a quoted glob pattern of several; repeat.",
    flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Where the table and figures go (created; files of an "
                           "earlier compare are replaced).", flag_values=FLAGS)
_IGNORE = flags.DEFINE_string("ignore", "", "Regex of config fields to leave out of the table "
                              "and legends (e.g. fields that differ only because the runs came "
                              "from different code versions).", flag_values=FLAGS)

FIGURES = ("loss_curves", "metric_vs_prefix_length", "metric_vs_trainable_params",
           "metric_vs_train_examples")
_FIGURES = flags.DEFINE_list("figures", list(FIGURES), "Which figures to write, by name "
                             f"(comma-separated, of {', '.join(FIGURES)}).", flag_values=FLAGS)

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
    return workdir_io.read_json(os.path.dirname(path), os.path.basename(path),
                                fix="fix or remove that run")


def _read_metrics(path: str) -> list[dict[str, float]]:
    """The rows of metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    rows = workdir_io.read_jsonl(os.path.dirname(path), os.path.basename(path),
                                 fix="fix or remove that run")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "step" not in row:
            raise UserError(f"{path}: unreadable (row {n} has no 'step'); fix or remove that "
                            "run")
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


# ---- Replicates: runs that differ only in seed / subsample are one setting, n times ---------

REPLICATE_FIELDS = ("seed", "data.subsample_seed")


@dataclasses.dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float | None  # sample std (n-1); None for one run
    low: float | None  # the 95% interval (Student's t); None for one run
    high: float | None


def summarize(values: list[float]) -> Summary:
    """n, mean, sample std and the 95% t interval of the mean of `values` (n >= 1)."""
    from scipy import stats

    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Summary(n, mean, None, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def setting_fields(records: list[RunRecord], ignore: str = "") -> list[str]:
    """The differing fields that make a setting (all but the replicate fields)."""
    return [f for f in differing_fields(records, ignore) if f not in REPLICATE_FIELDS]


def settings(records: list[RunRecord], fields: list[str]) -> dict[str, list[RunRecord]]:
    """Runs grouped by their values of `fields` (replicates of one setting together), in the
    order each setting first appears."""
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        key = json.dumps([r.config.get(f, MISSING) for f in fields], default=str)
        groups.setdefault(key, []).append(r)
    return groups


def _value_order(value) -> tuple:
    """Numbers before text, numbers by value (so 50 sorts before 100)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return (1, str(value))
    return (0, value)


def _summary_cell(s: Summary | None) -> str:
    if s is None:
        return MISSING
    if s.std is None:
        return f"{s.mean:.2f} (n=1)"
    return f"{s.mean:.2f} ± {s.std:.2f} [{s.low:.2f}, {s.high:.2f}]"


def grouped_table(records: list[RunRecord], ignore: str = "") -> str | None:
    """One row per setting (ordered by its field values, numbers by value): n, then mean ± std
    [95% interval] of each metric over its replicates; None when no two runs are replicates of
    one setting."""
    if not any(f in REPLICATE_FIELDS for f in differing_fields(records, ignore)):
        return None
    fields = setting_fields(records, ignore)
    names = panels(records)
    header = ["setting", *fields, "n", *(m if m == FINAL_LOSS else f"best {m}" for m in names)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups = sorted(settings(records, fields).values(),
                    key=lambda m: [_value_order(m[0].config.get(f, MISSING)) for f in fields])
    for members in groups:
        cells = [describe(members[0], fields) if fields else "all",
                 *(_cell(members[0].config.get(f, MISSING)) for f in fields), str(len(members))]
        for metric in names:
            values = [v for v in panel_values(members, metric) if v is not None]
            cells.append(_summary_cell(summarize(values) if values else None))
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"Replicates: runs that differ only in {' / '.join(REPLICATE_FIELDS)} form one "
            "setting; each cell is mean ± sample std [95% interval of the mean, Student's t] "
            "over the setting's runs that have the metric (n counts its runs).")
    return "\n".join(lines) + "\n\n" + note + "\n"


# ---- Figures and the tool ------------------------------------------------------------------

LENGTH = "prefix.length"
TRAIN_EXAMPLES = "data.train_examples"
FINAL_LOSS = "final train/loss"


def panel_values(records, metric: str) -> list[float | None]:
    if metric == FINAL_LOSS:
        return [(s[-1][1] if (s := r.series("train/loss")) else None) for r in records]
    return [r.best(metric) for r in records]


def panels(records) -> list[str]:
    metrics = sorted({m for r in records for m in r.eval_metrics()})
    return [*metrics, FINAL_LOSS]


def save(fig, path: str) -> None:
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    workdir_io.write_bytes(os.path.dirname(path), os.path.basename(path), png.getvalue())
    print(f"wrote {path}")


def plot_loss_curves(plt, records, fields, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        series = r.series("train/loss")
        if series:
            steps, values = zip(*series)
            ax.plot(steps, values, marker="." if len(series) < 20 else None,
                    label=describe(r, fields))
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=7 if len(records) <= 12 else 5, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))
    save(fig, path)
    plt.close(fig)


def plot_against(plt, records, x_of, x_label: str, log_x: bool, path: str,
                 group_fields: list[str]) -> None:
    """One panel per metric; one line per group (runs equal in `group_fields`)."""
    names = panels(records)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    groups: dict[str, list] = {}
    for r in records:
        groups.setdefault(describe(r, group_fields) if group_fields else "", []).append(r)
    for ax, metric in zip(axes[0], names):
        for name, members in groups.items():
            points = sorted((x_of(r), y) for r, y in zip(members, panel_values(members, metric))
                            if y is not None and x_of(r) is not None)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=name or None)
        if log_x:
            ax.set_xscale("log")
        else:  # the swept values themselves (e.g. lengths 1, 5, 10, 20, 40)
            ax.set_xticks(sorted({x for r in records if (x := x_of(r)) is not None}))
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric if metric == FINAL_LOSS else f"best {metric}")
        ax.grid(alpha=0.3)
        if len(groups) > 1 and ax.has_data():
            ax.legend(fontsize=6)
    save(fig, path)
    plt.close(fig)


def _follows_size(records: list[RunRecord], field: str) -> bool:
    """Whether `field` has one value per data.train_examples value over `records`."""
    seen: dict[str, str] = {}
    for r in records:
        size = json.dumps(r.config.get(TRAIN_EXAMPLES, MISSING))
        value = json.dumps(r.config.get(field, MISSING), sort_keys=True)
        if seen.setdefault(size, value) != value:
            return False
    return True


def plot_vs_train_examples(plt, records, fields, path: str) -> None:
    """One panel per metric: x = data.train_examples, one line per method (the setting's
    other fields), the mean over replicates with its 95% interval as error bars."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    # a field set per size by the protocol (e.g. train.num_steps) is part of the x value, not
    # a method of its own
    methods = [f for f in fields if f != TRAIN_EXAMPLES and not _follows_size(records, f)]
    names = panels(records)
    lines = list(settings(records, methods).values())
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], names):
        for i, members in enumerate(lines):
            # Methods share the sizes, so their error bars would overlap: each line is drawn
            # a few percent to the side of the size (log x), the ticks stay at the sizes.
            dodge = 1 + 0.03 * (i - (len(lines) - 1) / 2)
            points = []
            for runs in settings(members, [TRAIN_EXAMPLES]).values():
                values = [v for v in panel_values(runs, metric) if v is not None]
                x = runs[0].config.get(TRAIN_EXAMPLES)
                if values and isinstance(x, (int, float)):
                    points.append((x, summarize(values)))
            if not points:
                continue
            points.sort(key=lambda p: p[0])
            xs = [x * dodge for x, _ in points]
            ys = [s.mean for _, s in points]
            errors = [[s.mean - s.low if s.low is not None else 0 for _, s in points],
                      [s.high - s.mean if s.high is not None else 0 for _, s in points]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, color=f"C{i}",
                        label=describe(members[0], methods) if methods else None)
        ax.set_xscale("log")
        ax.set_xticks(sorted({x for r in records
                              if isinstance(x := r.config.get(TRAIN_EXAMPLES), (int, float))}))
        ax.get_xaxis().set_major_formatter(ScalarFormatter())  # 50, not 5 x 10^1
        ax.get_xaxis().set_minor_formatter(NullFormatter())
        ax.set_xlabel("training examples")
        ax.set_ylabel(metric if metric == FINAL_LOSS else f"best {metric}")
        ax.grid(alpha=0.3)
    if methods:
        # One legend for every panel, below them: method labels are long (every field in
        # which the methods differ) and would cover the points inside a panel.
        # (saved with bbox_inches="tight", so the image grows to hold it).
        legend = {}
        for ax in axes[0]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        fig.legend(list(legend.values()), list(legend), loc="upper center", fontsize=7,
                   frameon=False, ncol=1 if len(legend) <= 4 else 2, bbox_to_anchor=(0.5, 0.0))
    dodged = " (each method drawn slightly to the side of its size)" if len(lines) > 1 else ""
    fig.suptitle(f"mean and 95% interval over seeds and subsets{dodged}", fontsize=9)
    save(fig, path)
    plt.close(fig)


def plot_params(plt, records, fields, path: str) -> None:
    """One panel per metric: each run a point at its trainable parameter count (log scale),
    labelled by its differing fields (unlabelled past 12 runs: they would overlap)."""
    names = panels(records)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], names):
        for r, y in zip(records, panel_values(records, metric)):
            x = (r.params or {}).get("trainable")
            if y is None or not x:
                continue
            ax.scatter([x], [y], s=18)
            if len(records) <= 12:
                ax.annotate(describe(r, fields), (x, y), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(metric if metric == FINAL_LOSS else f"best {metric}")
        ax.grid(alpha=0.3)
    save(fig, path)
    plt.close(fig)


def expand_workdirs(patterns: list[str]) -> list[str]:
    """Each --workdir as given, or, for a glob pattern naming no existing path, every directory
    it matches (sorted): runs are named by pattern without the shell's expansion."""
    workdirs = []
    for pattern in patterns:
        if os.path.exists(pattern) or not glob.has_magic(pattern):
            workdirs.append(pattern)
            continue
        matches = sorted(p for p in glob.glob(pattern) if os.path.isdir(p))
        if not matches:
            raise UserError(f"--workdir={pattern} matches no directory; give training run "
                            "workdirs")
        workdirs.extend(matches)
    return workdirs


def main() -> None:
    if not _WORKDIR.value or not _OUT.value:
        cli.fail("--workdir (repeat it, or give a quoted glob) and --out are required: the "
                 "runs to compare and the directory for the table and figures")
    out = _OUT.value
    if os.path.exists(out) and not os.path.isdir(out):
        cli.fail(f"--out={out} is a file; give a directory")
    try:
        re.compile(_IGNORE.value)
    except re.error as e:
        cli.fail(f"--ignore={_IGNORE.value!r} is not a valid regex ({e})")

    unknown = sorted(set(_FIGURES.value) - set(FIGURES))
    if unknown:
        cli.fail(f"--figures: no figure named {', '.join(unknown)}; choose among "
                 f"{', '.join(FIGURES)}")
    figures = set(_FIGURES.value)

    records = read_runs(expand_workdirs(_WORKDIR.value))  # all read before anything is written
    fields = differing_fields(records, _IGNORE.value)
    os.makedirs(out, exist_ok=True)
    table_path = os.path.join(out, "table.md")
    grouped = grouped_table(records, _IGNORE.value)
    workdir_io.write_text(out, "table.md", table(records, _IGNORE.value)
                          + (f"\n## Mean over replicates\n\n{grouped}" if grouped else ""))
    print(f"wrote {table_path}")

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    def png(name: str) -> str:  # a figure's file is its --figures name
        return os.path.join(out, f"{name}.png")

    if "loss_curves" in figures:
        plot_loss_curves(plt, records, fields, png("loss_curves"))
    if "metric_vs_prefix_length" in figures and LENGTH in fields:
        others = [f for f in fields if f != LENGTH]
        plot_against(plt, records, lambda r: r.config.get(LENGTH), "prefix length",
                     False, png("metric_vs_prefix_length"), others)
    if "metric_vs_train_examples" in figures and TRAIN_EXAMPLES in fields:
        plot_vs_train_examples(plt, records, setting_fields(records, _IGNORE.value),
                               png("metric_vs_train_examples"))
    if "metric_vs_trainable_params" in figures and any(r.params for r in records):
        plot_params(plt, records, fields, png("metric_vs_trainable_params"))


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
