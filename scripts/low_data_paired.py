r"""Paired differences of the low-data experiment, per training-set size.

  python scripts/low_data_paired.py docs/low_data/runs

Reads each run summary directory's config.json and results.json (as copied under
docs/low_data/runs/ by scripts/low_data_report.sh), names each run's method from its config
(`method_of`), pairs runs of two methods that agree on the training-set size, subset and seed,
and prints one markdown table per comparison: each pair's dev BLEU difference and, per size,
their mean with a 95% interval (Student's t over pairs). Pairing removes the variation between
subsets that both methods share, which the unpaired means of `prefix_jax.compare` keep.
Comparisons: prefix tuning with real-word init minus (1) random init, (2) full fine-tuning,
(3) prompt tuning; a comparison with no pairs yet prints no table.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from scipy import stats

# (method, baseline): the table of method minus baseline, as the paper's claims are stated.
COMPARISONS = (("prefix", "prefix_rnd"), ("prefix", "finetune"), ("prefix", "prompt"))
LABELS = {"prefix": "prefix (real-word init)", "prefix_rnd": "prefix (random init)",
          "finetune": "fine-tuning", "prompt": "prompt tuning"}


def method_of(config: dict) -> str | None:
    """The low-data method a run's config is (experiments/e2e_low_data.METHODS), or None."""
    prefix = config["prefix"]
    if config["trainable"] == "^base/" and prefix["length"] == 0:
        return "finetune"
    if config["trainable"] != "^prefix/":
        return None
    if prefix["mode"] == "input":
        return "prompt"
    if prefix["mode"] == "kv":
        return {"text": "prefix", "random": "prefix_rnd"}.get(prefix["init"])
    return None


def read_runs(root: str) -> dict[tuple[int, int, int], dict[str, float]]:
    """{(train examples, subset, seed): {method: dev BLEU}} over the run summaries in root."""
    runs: dict[tuple[int, int, int], dict[str, float]] = {}
    for name in sorted(os.listdir(root)):
        with open(os.path.join(root, name, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(root, name, "results.json")) as f:
            bleu = json.load(f)["eval/bleu"]
        method = method_of(config)
        if method is None:
            continue
        key = (config["data"]["train_examples"], config["data"]["subsample_seed"], config["seed"])
        if method in runs.setdefault(key, {}):
            raise SystemExit(f"error: two {method} runs of {key} (size, subset, seed) in {root}; "
                             "keep one summary per run")
        runs[key][method] = bleu
    return runs


def paired_table(runs: dict, method: str, baseline: str) -> list[str]:
    """Markdown lines of method minus baseline per size; [] when no pair exists."""
    sizes = sorted({k[0] for k, v in runs.items() if {method, baseline} <= v.keys()})
    if not sizes:
        return []
    lines = [f"{LABELS[method]} minus {LABELS[baseline]}, dev BLEU:", "",
             "| train examples | pairs (subset, seed): difference | n | mean [95% interval] |",
             "|---|---|---|---|"]
    for size in sizes:
        pairs = [(k[1], k[2], v[method] - v[baseline]) for k, v in sorted(runs.items())
                 if k[0] == size and {method, baseline} <= v.keys()]
        diffs = [d for *_, d in pairs]
        listed = ", ".join(f"({s}, {r}): {d:+.2f}" for s, r, d in pairs)
        if len(diffs) > 1:
            mean, sem = statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
            half = stats.t.ppf(0.975, len(diffs) - 1) * sem
            summary = f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"
        else:
            summary = f"{diffs[0]:+.2f} (one pair: no interval)"
        lines.append(f"| {size} | {listed} | {len(diffs)} | {summary} |")
    return [*lines, ""]


def main(root: str) -> None:
    runs = read_runs(root)
    for method, baseline in COMPARISONS:
        for line in paired_table(runs, method, baseline):
            print(line)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/low_data_paired.py RUN_SUMMARIES_DIR")
    main(sys.argv[1])
