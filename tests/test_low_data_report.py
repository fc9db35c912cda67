"""scripts/low_data_report.sh and scripts/low_data_paired.py on fabricated run workdirs.

The configs are a committed low-data run's config.json with the method fields changed, so
the scripts see the same fields the real runs carry; the BLEU values are chosen here, so every
paired difference below is known in advance.
"""

import copy
import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import low_data_paired  # noqa: E402

SCRIPT = os.path.join(REPO, "scripts", "low_data_report.sh")
TEMPLATE = sorted(glob.glob(
    os.path.join(REPO, "docs", "low_data", "runs", "prefix.init=text,*")))[0]


def _config(method: str, size: int, subset: int, seed: int) -> dict:
    with open(os.path.join(TEMPLATE, "config.json")) as f:
        config = json.load(f)
    config = copy.deepcopy(config)
    config["data"].update(train_examples=size, subsample_seed=subset)
    config["seed"] = seed
    if method == "prefix_rnd":
        config["prefix"]["init"] = "random"
    elif method == "finetune":
        config["prefix"].update(length=0, init="random")
        config["trainable"], config["optim"]["lr"] = "^base/", 1e-4
    elif method == "prompt":
        config["prefix"].update(mode="input", positions="after_prefix")
    return config


def _write_run(root: str, method: str, size: int, subset: int, seed: int,
               bleu: float | None) -> str:
    workdir = os.path.join(root, f"{method},size={size},subset={subset},seed={seed}")
    os.makedirs(os.path.join(workdir, "checkpoints", "10"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(_config(method, size, subset, seed), f)
    with open(os.path.join(workdir, "params.json"), "w") as f:
        json.dump({"trainable": 1000, "base": 100000}, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 10, "train/loss": 1.0}) + "\n")
        if bleu is not None:
            f.write(json.dumps({"step": 10, "eval/bleu": bleu, "eval/rouge_l": 50.0}) + "\n")
    if bleu is not None:  # finished
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({"eval/bleu": bleu, "eval/rouge_l": 50.0, "step": 10}, f)
    return workdir


@pytest.mark.parametrize("method", ["prefix", "prefix_rnd", "finetune", "prompt"])
def test_method_of_names_each_low_data_method(method):
    assert low_data_paired.method_of(_config(method, 50, 0, 0)) == method


def test_report_copies_finished_runs_and_pairs_methods_by_subset_and_seed(tmp_path):
    sweep, out = str(tmp_path / "sweep"), str(tmp_path / "out")
    bleu = {  # (method, size, subset, seed) -> dev BLEU
        ("prefix", 50, 0, 0): 50.0, ("prefix_rnd", 50, 0, 0): 47.0, ("finetune", 50, 0, 0): 52.5,
        ("prefix", 50, 1, 0): 48.0, ("prefix_rnd", 50, 1, 0): 47.0,
        ("prefix", 100, 0, 0): 55.0, ("prefix_rnd", 100, 0, 0): 56.0,
    }
    for (method, size, subset, seed), value in bleu.items():
        _write_run(sweep, method, size, subset, seed, value)
    _write_run(sweep, "finetune", 50, 1, 0, None)  # unfinished: not reported
    # A summary from an earlier report whose workdir is gone still counts.
    kept = _write_run(out + "/runs", "prompt", 50, 0, 0, 44.0)

    result = subprocess.run(["bash", SCRIPT, sweep, out], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    assert "copied 7 finished runs" in result.stdout and "(8 summaries in all)" in result.stdout
    summaries = sorted(os.listdir(os.path.join(out, "runs")))
    assert len(summaries) == 8 and os.path.basename(kept) in summaries
    assert "finetune,size=50,subset=1,seed=0" not in summaries
    assert not os.path.exists(os.path.join(out, "runs", summaries[0], "checkpoints"))

    with open(os.path.join(out, "paired.md")) as f:
        paired = f.read()
    # real-word minus random: size 50 pairs +3 and +1 (mean +2), size 100 one pair of -1
    assert "| 50 | (0, 0): +3.00, (1, 0): +1.00 | 2 | +2.00 [" in paired
    assert "| 100 | (0, 0): -1.00 | 1 | -1.00 (one pair: no interval) |" in paired
    assert "| 50 | (0, 0): -2.50 | 1 |" in paired.split("minus fine-tuning")[1]
    assert "| 50 | (0, 0): +6.00 | 1 |" in paired.split("minus prompt tuning")[1]
    with open(os.path.join(out, "table.md")) as f:
        table = f.read()
    assert "## Mean over replicates" in table
    # Only the figure the experiment reads: 96 runs' loss curves and a prefix-length plot of
    # one length would be megabytes of noise in every results commit.
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == [
        "metric_vs_train_examples.png"]


def test_report_refuses_a_missing_sweep_directory(tmp_path):
    result = subprocess.run(["bash", SCRIPT, str(tmp_path / "nowhere"), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no sweep directory" in result.stderr
    assert not os.path.exists(tmp_path / "out")


def test_compare_refuses_an_unknown_figure_and_writes_nothing(tmp_path):
    run = _write_run(str(tmp_path / "runs"), "prefix", 50, 0, 0, 50.0)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "prefix_jax.compare", f"--workdir={run}", f"--out={out}",
         "--figures=metric_vs_train_examples,loss_curve"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "--figures: no figure named loss_curve; choose among loss_curves," in result.stderr
    assert not out.exists()
