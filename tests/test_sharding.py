"""Sharded training: 8 CPU devices and 2 processes give the one-device result.

Each run is the real CLI in a subprocess (XLA_FLAGS must be set before JAX starts): 3 steps of
the runlocal config at global batch 8, launched together once for the module, then compared.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh

from prefix_jax.training import checkpoint, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = [f"--config={os.path.join(REPO, 'experiments', 'e2e_smollm2.py')}:runlocal",
          "--config.train.batch_size=8", "--config.train.num_steps=3",
          "--config.train.log_every=1", "--config.eval.num_examples=0",
          "--config.eval.eval_untuned=False"]
# run name -> (devices per process, processes, mesh flags)
RUNS = {
    "one_device": (1, 1, []),
    "data8": (8, 1, ["--config.mesh.data=8"]),
    "data2_fsdp4": (8, 1, ["--config.mesh.data=2", "--config.mesh.fsdp=4"]),
    "fsdp8": (8, 1, ["--config.mesh.data=1", "--config.mesh.fsdp=8"]),
    "tensor_parallel": (8, 1, ["--config.mesh.data=2", "--config.mesh.fsdp=2",
                               "--config.mesh.tensor=2"]),
    "two_processes": (4, 2, ["--config.mesh.data=2", "--config.mesh.fsdp=4"]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, devices: int, flags: list[str], process=None) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if process is not None:
        index, count, port = process
        flags = [*flags, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                 f"--config.distributed.num_processes={count}",
                 f"--config.distributed.process_id={index}"]
    return subprocess.Popen([sys.executable, "-m", "prefix_jax.main", *COMMON, *flags,
                             f"--workdir={workdir}"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait(procs: list[subprocess.Popen], name: str) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}: exit {p.returncode}\n{out[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workdir of every run in RUNS, all launched at once."""
    root = tmp_path_factory.mktemp("meshes")
    procs = {}
    for name, (devices, count, flags) in RUNS.items():
        if count == 1:
            procs[name] = [_launch(root / name, devices, flags)]
        else:
            port = _free_port()
            procs[name] = [_launch(root / name, devices, flags, (i, count, port))
                           for i in range(count)]
    for name, ps in procs.items():
        _wait(ps, name)
    return {name: root / name for name in RUNS}


def _losses(workdir) -> np.ndarray:
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return np.array([r["train/loss"] for r in rows if "train/loss" in r])


def _prefix(workdir) -> dict[str, np.ndarray]:
    state = checkpoint.load_state_arrays(str(workdir))
    return {k: np.asarray(v) for k, v in state["trainable"]["prefix"].items()}


def _layout(workdir) -> dict:
    with open(workdir / "sharding.json") as f:
        return json.load(f)


def _assert_close(a: np.ndarray, b: np.ndarray, what: str) -> None:
    relative = np.max(np.abs(a - b)) / np.max(np.abs(b))
    assert relative <= 1e-5, f"{what}: relative difference {relative:.2e}"


@pytest.mark.parametrize("name", ["data8", "data2_fsdp4", "fsdp8", "tensor_parallel",
                                  "two_processes"])
def test_mesh_trains_like_one_device(runs, name):
    reference = runs["one_device"]
    assert len(_losses(reference)) == 3
    _assert_close(_losses(runs[name]), _losses(reference), f"{name} losses")
    mine, ref = _prefix(runs[name]), _prefix(reference)
    for key in ref:
        _assert_close(mine[key], ref[key], f"{name} prefix/{key}")
    assert _layout(runs[name])["devices"] == 8


def test_fsdp8_holds_an_eighth_of_the_base_per_device(runs):
    fsdp, data = _layout(runs["fsdp8"]), _layout(runs["data8"])
    assert fsdp["base_bytes"] == data["base_bytes"] > 0
    assert fsdp["base_bytes_per_device_max"] <= fsdp["base_bytes"] / 8 * 1.05
    # the measure can fail: data parallelism replicates the whole base on every device
    assert data["base_bytes_per_device_max"] == data["base_bytes"]
    assert fsdp["specs"]["frozen/base/layers/q_proj/kernel"] == "P(None, 'fsdp', None)"
    tp = _layout(runs["tensor_parallel"])["specs"]
    assert tp["frozen/base/layers/q_proj/kernel"] == "P(None, 'fsdp', 'tensor')"
    assert tp["frozen/base/layers/down_proj/kernel"] == "P(None, 'tensor', 'fsdp')"


def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    two = _layout(runs["two_processes"])
    assert two["processes"] == 2 and two["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    workdir = tmp_path / "resumed"
    shutil.copytree(runs["two_processes"], workdir)
    proc = _launch(workdir, 1, ["--config.train.num_steps=4"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from step 3" in out
    losses = _losses(workdir)
    assert len(losses) == 4 and np.isfinite(losses[-1])


_MESH = AbstractMesh((2, 4, 2), sharding.MESH_AXES)  # shapes only: no devices needed


def test_logical_spec_follows_rules_and_divisibility():
    rules = sharding.parse_rules((("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
                                  ("batch", ("data", "fsdp"))))
    spec = sharding.logical_spec(("layers", "embed", "heads"), (2, 64, 32), _MESH, rules)
    assert tuple(spec) == (None, "fsdp", "tensor")
    # 3 KV heads' worth of columns do not split over tensor=2: replicated, not wrong
    spec = sharding.logical_spec(("layers", "embed", "kv_heads"), (2, 64, 3), _MESH, rules)
    assert tuple(spec) == (None, "fsdp", None)
    # a mesh axis is used once per array
    spec = sharding.logical_spec(("embed", "embed"), (64, 64), _MESH, rules)
    assert tuple(spec) == ("fsdp", None)
    spec = sharding.logical_spec(("batch", None), (16, 5), _MESH, rules)
    assert tuple(spec) == (("data", "fsdp"), None)


def test_rules_naming_an_unknown_mesh_axis_are_refused():
    from prefix_jax.errors import UserError

    with pytest.raises(UserError, match="mesh axis 'model'"):
        sharding.parse_rules((("heads", "model"),))
