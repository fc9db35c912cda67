"""The runlocal config end to end: falling loss, outputs in the workdir, resume after a crash
to the same final prefix as an uninterrupted run."""

import json

import jax
import numpy as np
import pytest

from prefix_jax import train
from prefix_jax.training import checkpoint
from tests.helpers import crash_run_after_checkpoint, runlocal_config


def _read_metrics(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    result = train.train_and_evaluate(runlocal_config(), str(workdir))
    return workdir, result


def test_runlocal_trains_with_falling_loss_and_writes_outputs(uninterrupted):
    workdir, result = uninterrupted
    losses = [m["train/loss"] for m in _read_metrics(workdir) if "train/loss" in m]
    assert len(losses) >= 4
    assert losses[-1] < losses[0] - 0.5, losses
    for name in ("config.json", "metrics.jsonl", "results.json", "eval_untuned.json"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tensorboard").iterdir())
    rows = _read_metrics(workdir)
    assert any("eval/bleu" in m and "eval/rouge_l" in m for m in rows)
    assert all(m["train/tokens_per_sec"] > 0 for m in rows if "train/tokens_per_sec" in m)
    assert "eval/bleu" in result and "eval_untuned/bleu" in result
    with open(workdir / "params.json") as f:
        counted = json.load(f)
    assert counted["trainable"] == 2 * 2 * 10 * 2 * 16  # key+value x L x P x kv_heads x head_dim
    assert counted["trainable_percent"] == pytest.approx(100 * counted["trainable"]
                                                         / counted["base"])
    with open(workdir / "generations" / "dev_step30.jsonl") as f:
        first = json.loads(f.readline())
    assert set(first) == {"source", "prediction", "references"} and first["references"]


def test_checkpoint_holds_no_base(uninterrupted):
    workdir, _ = uninterrupted
    saved = checkpoint.load_state_arrays(str(workdir))
    assert not jax.tree.leaves(saved["trainable"].get("base", {}))
    sizes = [np.asarray(x).size for x in jax.tree.leaves(saved)]
    assert max(sizes) <= np.asarray(saved["trainable"]["prefix"]["key"]).size


def test_crash_and_rerun_resumes_at_its_step(uninterrupted, tmp_path, monkeypatch, capsys):
    full_dir, full_result = uninterrupted
    workdir = tmp_path / "crashy"
    config = runlocal_config()
    crash_run_after_checkpoint(config, str(workdir), 20)

    capsys.readouterr()
    result = train.train_and_evaluate(config, str(workdir))
    assert "resumed from step 20" in capsys.readouterr().out
    # Same data order and same steps: the final prefix is bitwise the uninterrupted one.
    want = checkpoint.load_state_arrays(str(full_dir))["trainable"]["prefix"]
    got = checkpoint.load_state_arrays(str(workdir))["trainable"]["prefix"]
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert result["eval/bleu"] == full_result["eval/bleu"]
