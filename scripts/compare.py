r"""Compare training runs: a markdown table and matplotlib figures of an ablation.

  python scripts/compare.py runs/sweeps/e2e_smollm2/prefix.length=* --out docs/length
  python scripts/compare.py runs/p10 runs/prompt runs/finetune --out /tmp/cmp

Writes into DIR:
  table.md                        one row per run: the config fields that differ between the
                                  runs, trainable parameters and %, best and final dev metrics,
                                  train tokens/s, checkpoint size
  loss_curves.png                 train loss against step, every run
  metric_vs_prefix_length.png     best dev metrics (and final train loss) against prefix.length,
                                  one line per value of the other differing fields (only when
                                  prefix.length differs)
  metric_vs_trainable_params.png  the same against trainable parameters (log scale)
A workdir that is missing, has no config.json, or holds an unreadable file is an error (exit 2).
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prefix_jax import cli

LENGTH = "prefix.length"
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
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


def plot_loss_curves(plt, records, fields, path: str) -> None:
    from prefix_jax.compare import describe

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
    from prefix_jax.compare import describe

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


def plot_params(plt, records, fields, path: str) -> None:
    """One panel per metric: each run a point at its trainable parameter count (log scale),
    labelled by its differing fields (unlabelled past 12 runs: they would overlap)."""
    from prefix_jax.compare import describe

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


def main() -> None:
    parser = cli.Parser(prog="scripts/compare.py", description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="training run workdirs")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the table and "
                        "figures go (created; files of an earlier compare are replaced)")
    parser.add_argument("--ignore", default="", metavar="REGEX",
                        help="config fields to leave out of the table and legends (e.g. fields "
                        "that differ only because the runs came from different code versions)")
    args = parser.parse_args()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        cli.fail(f"--out {args.out} is a file; give a directory")
    try:
        re.compile(args.ignore)
    except re.error as e:
        cli.fail(f"--ignore={args.ignore!r} is not a valid regex ({e})")

    from prefix_jax import compare

    records = compare.read_runs(args.workdirs)  # every run read before anything is written
    fields = compare.differing_fields(records, args.ignore)
    os.makedirs(args.out, exist_ok=True)
    table_path = os.path.join(args.out, "table.md")
    with open(table_path, "w", encoding="utf-8") as f:
        f.write(compare.table(records, args.ignore))
    print(f"wrote {table_path}")

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    plot_loss_curves(plt, records, fields, os.path.join(args.out, "loss_curves.png"))
    if LENGTH in fields:
        others = [f for f in fields if f != LENGTH]
        plot_against(plt, records, lambda r: r.config.get(LENGTH), "prefix length",
                     False, os.path.join(args.out, "metric_vs_prefix_length.png"), others)
    if any(r.params for r in records):
        plot_params(plt, records, fields, os.path.join(args.out,
                                                       "metric_vs_trainable_params.png"))


if __name__ == "__main__":
    cli.run(main)
