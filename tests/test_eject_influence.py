"""`python -m prefix_jax.eject` and `prefix_jax.layer_influence` on a short MLP-prefix run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from prefix_jax import eject, layer_influence, train
from prefix_jax.errors import UserError
from prefix_jax.serving import bank
from tests.helpers import runlocal_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _short(**overrides):
    fields = dict(train__num_steps=3, train__eval_every=0, eval__num_examples=0,
                  eval__eval_untuned=False, prefix__reparam="mlp", prefix__mlp_hidden=16,
                  prefix__layers="top:1")
    fields.update(overrides)
    return runlocal_config(**fields)


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mlp")
    train.train_and_evaluate(_short(), str(workdir))
    return workdir


def test_eject_keeps_the_prefix_and_the_run_resumes(mlp_run, tmp_path):
    out = tmp_path / "flat"
    summary = eject.eject_workdir(str(mlp_run), str(out))
    assert summary["step"] == 3 and summary["flat_params"] < summary["mlp_params"]
    mlp, flat = bank.load([str(mlp_run)]), bank.load([str(out)])
    assert flat.configs[0].prefix.reparam == "none"
    np.testing.assert_allclose(flat.prefixes.k, mlp.prefixes.k, atol=1e-5)
    np.testing.assert_allclose(flat.prefixes.v, mlp.prefixes.v, atol=1e-5)
    assert flat.options == mlp.options  # layer subset travels with the config
    config = _short(prefix__reparam="none", train__num_steps=4)  # the flat run, one more step
    train.train_and_evaluate(config, str(out))
    assert bank.load([str(out)]).steps == (4,)


def test_eject_refuses_bad_input(mlp_run, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty directory"):
        eject.eject_workdir(str(mlp_run), str(busy))
    assert os.listdir(busy) == ["keep.txt"]
    flat = tmp_path / "flat_run"
    train.train_and_evaluate(_short(prefix__reparam="none", train__num_steps=1), str(flat))
    result = subprocess.run([sys.executable, "-m", "prefix_jax.eject", "--workdir", str(flat),
                             "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "already flat" in result.stderr and not (tmp_path / "x").exists()


def test_layer_influence_with_every_layer_removed_is_the_base(mlp_run, tmp_path):
    result = layer_influence.measure(str(mlp_run), limit=6, batch_size=3)
    assert result["trained_layers"] == [1]
    np.testing.assert_allclose(result["all_removed"], result["base"], rtol=1e-5)
    assert abs(result["full"] - result["base"]) > 1e-4  # the prefix acts: the check can fail
    only = result["layers"][0]
    np.testing.assert_allclose(only["only"], result["full"], rtol=1e-6)  # one trained layer
    np.testing.assert_allclose(only["removed"], result["base"], rtol=1e-5)
    layer_influence.write(result, str(tmp_path / "out"))
    png = (tmp_path / "out" / "layer_influence.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    table = (tmp_path / "out" / "layer_influence.md").read_text()
    assert "| 1 |" in table
    assert json.loads((tmp_path / "out" / "layer_influence.json").read_text())["step"] == 3
