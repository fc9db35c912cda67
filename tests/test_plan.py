"""bench/plan.py: the compiled memory plan of the real train step, from abstract arrays only.

The CLI runs in a subprocess (the simulated device count must be set before JAX starts its CPU
backend) on the tiny shape and 4 devices: compile only, no weights exist.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from prefix_jax.bench import plan
from prefix_jax.models import llama_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_plan(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "prefix_jax.bench.plan", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def _rows(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("| ") and "seq" not in line]


def test_plan_compiles_tiny_shape_on_four_devices():
    result = _run_plan("--model=tiny", "--devices=4", "--seq_lens=32", "--remats=full",
                       "--param_dtype=float32", "--dtype=float32", "--budgets_gib=1",
                       "--unit=MiB")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _rows(result.stdout)
    assert [r[:3] for r in rows] == [["32", "full", "1"], ["32", "full", "2"]]
    one, two = ([float(x) for x in r[3:8]] for r in rows)
    assert one[0] == two[0] > 0  # the base's shard does not depend on the batch
    assert two[4] > one[4]  # the peak grows with the rows
    assert "mesh data=1 x fsdp=4 x tensor=1 (4 simulated devices)" in result.stdout
    assert "replicated full-size base weights on a device: none" in result.stdout


def test_plan_refuses_a_device_count_the_tensor_axis_does_not_divide():
    result = _run_plan("--model=tiny", "--devices=4", "--tensor=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --devices=4")


class _Sharding:
    """Duck-typed stand-in for a NamedSharding: each device holds `1/split` of dimension 0."""

    def __init__(self, split: int):
        self.split = split

    def shard_shape(self, shape):
        return (shape[0] // self.split, *shape[1:])


def test_replicated_weights_names_a_whole_matrix_not_a_vector_or_a_shard():
    frozen = {"q": jax.ShapeDtypeStruct((8, 4), np.float32),
              "k": jax.ShapeDtypeStruct((8, 4), np.float32),
              "scale": jax.ShapeDtypeStruct((8,), np.float32)}
    shardings = {"q": _Sharding(1), "k": _Sharding(4), "scale": _Sharding(1)}
    assert plan.replicated_weights(frozen, shardings, n_devices=4) == ("q",)
    assert plan.replicated_weights(frozen, shardings, n_devices=1) == ()


@pytest.mark.parametrize("name,billions", [("smollm2-1.7b", 1.711), ("llama-3.2-1b", 1.236),
                                           ("llama-3.1-8b", 8.030), ("llama-3.1-70b", 70.554)])
def test_public_shapes_have_their_published_parameter_counts(name, billions):
    params = llama_shapes.abstract_params(llama_shapes.config(name), "bfloat16")
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert round(count / 1e9, 3) == billions


def test_largest_rows_is_the_linear_fit():
    one = plan.Plan(1, 0, 0, 0, arguments=10, outputs=0, alias=0, temp=5, compile_s=0,
                    replicated=())
    two = dataclasses.replace(one, rows=2, temp=8)  # 3 bytes a row, 12 fixed
    assert plan.largest_rows(one, two, 30) == 6
    assert plan.largest_rows(one, two, 11) == 0
