r"""Paired differences of the low-data experiment: real-word minus random prefix init, per run pair.

  python scripts/low_data_paired.py docs/low_data/runs

Reads each run summary directory's config.json and results.json (as copied under
docs/low_data/runs/), pairs the `prefix.init=text` and `prefix.init=random` runs that agree on
everything else (training-set size, subset, seed, steps), and prints, per training-set size,
each pair's dev BLEU difference and their mean with a 95% interval (Student's t over pairs).
Pairing removes the variation between subsets that both inits share, which the unpaired
means of `prefix_jax.compare` keep.
"""

import json
import os
import statistics
import sys

from scipy import stats


def main(root: str) -> None:
    runs = {}
    for name in sorted(os.listdir(root)):
        with open(os.path.join(root, name, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(root, name, "results.json")) as f:
            bleu = json.load(f)["eval/bleu"]
        if config["prefix"]["mode"] != "kv" or config["trainable"] != "^prefix/":
            continue  # prefix tuning only (not prompt tuning or fine-tuning)
        key = (config["data"]["train_examples"], config["data"]["subsample_seed"],
               config["seed"], config["train"]["num_steps"])
        runs.setdefault(key, {})[config["prefix"]["init"]] = bleu
    print("| train examples | pairs (subset, seed): text - random BLEU | n | mean [95% interval] |")
    print("|---|---|---|---|")
    for size in sorted({k[0] for k in runs}):
        pairs = [(k[1], k[2], v["text"] - v["random"]) for k, v in sorted(runs.items())
                 if k[0] == size and {"text", "random"} <= v.keys()]
        diffs = [d for *_, d in pairs]
        listed = ", ".join(f"({s}, {r}): {d:+.2f}" for s, r, d in pairs)
        if len(diffs) > 1:
            mean, sem = statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
            half = stats.t.ppf(0.975, len(diffs) - 1) * sem
            summary = f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"
        else:
            summary = f"{diffs[0]:+.2f}" if diffs else "-"
        print(f"| {size} | {listed} | {len(diffs)} | {summary} |")


if __name__ == "__main__":
    main(sys.argv[1])
