"""`python -m prefix_jax.bench.train` end to end on the tiny model: both systems compute the
same loss (checked by the benchmark itself before timing) and the JSON carries every ratio.
Speed is not asserted."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_on_the_tiny_model(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "prefix_jax.bench.train", "--model", "tiny",
                        "--rounds", "1", "--steps", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=REPO,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("ratio_vs_peft_fixed", "ratio_vs_peft_e2e", "ratio_vs_peft_e2e_same_batches",
                "floor_fraction", "ratio_prefix_vs_full_finetune"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    for ours, peft in result["loss_check"].values():
        assert abs(ours - peft) <= 1e-3 * abs(peft)
    assert all(v > 0 for v in result["peak_rss_mib"].values())
    assert result["step_gflop"] > 0
    assert "| ratio | measured | target |" in r.stdout
