"""Packed runs (train_packed.py): R runs in one vmapped step equal the R runs trained one by one,
each workdir is an ordinary run's, incompatible runs are refused by field, resume works."""

import json
import os

import numpy as np
import pytest

from prefix_jax import train, train_packed
from prefix_jax.errors import UserError
from prefix_jax.training import checkpoint
from tests.helpers import SimulatedCrashError, runlocal_config


def _config(**overrides):
    # no decoding evaluation: this is about the training math; eval loss keeps a final metric
    fields = dict(train__num_steps=6, train__log_every=1, train__checkpoint_every=3,
                  eval__num_examples=0, eval__eval_untuned=False)
    return runlocal_config(**{**fields, **overrides})


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _prefix(workdir):
    _, arrays, _ = checkpoint.load_latest_arrays(workdir)
    return arrays


def _assert_close_trees(a, b):
    import jax
    # relative to each array's scale: a lone entry near zero may differ in its last bits
    # (the vmapped matmuls sum in another order)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert np.max(np.abs(x - y)) <= 1e-5 * np.max(np.abs(y)), np.max(np.abs(x - y))


def _variants(dropout=0.0):
    """Different learning rates, warmups, subsets (size and subsample seed) and schedule lengths
    (with `dropout`, each run's dropout keys from its own seed and step, as alone)."""
    return [_config(optim__lr=5e-2, data__train_examples=40, data__subsample_seed=0,
                    prefix__dropout=dropout),
            _config(optim__lr=1e-2, optim__warmup_steps=2, data__train_examples=40,
                    data__subsample_seed=1, prefix__dropout=dropout),
            _config(optim__lr=3e-2, data__train_examples=80, data__subsample_seed=2,
                    train__num_steps=4, prefix__dropout=dropout)]


def test_packed_equals_one_by_one(tmp_path):
    variants = _variants(dropout=0.1)
    alone = [str(tmp_path / f"alone{i}") for i in range(len(variants))]
    packed = [str(tmp_path / f"packed{i}") for i in range(len(variants))]
    for config, workdir in zip(variants, alone):
        train.train_and_evaluate(config, workdir)
    train_packed.train_packed(_variants(dropout=0.1), packed)
    for a, p in zip(alone, packed):
        la, lp = _losses(a), _losses(p)
        assert la.keys() == lp.keys() and len(la) >= 4
        np.testing.assert_allclose([lp[k] for k in sorted(lp)], [la[k] for k in sorted(la)],
                                   rtol=1e-5)
        _assert_close_trees(_prefix(p), _prefix(a))
        results_a, results_p = (_read_json(os.path.join(w, "results.json")) for w in (a, p))
        assert results_a["results_identity"] == results_p["results_identity"]
        assert results_a["step"] == results_p["step"]
    # the runs really differ from each other (else equality would prove little)
    assert _losses(packed[0]) != _losses(packed[1])


def test_packed_resume_after_crash(tmp_path):
    variants = _variants()[:2]
    packed = [str(tmp_path / f"packed{i}") for i in range(2)]
    alone = str(tmp_path / "alone")
    train.train_and_evaluate(_variants()[1], alone)

    def crash_at(step):
        if step == 3:
            raise SimulatedCrashError(step)

    with pytest.raises(SimulatedCrashError):
        train_packed.train_packed(variants, packed, train.Hooks(after_checkpoint=crash_at))
    # the crash came after run 0's step-3 save, before run 1's: the runs resume at 3 and 0
    assert checkpoint.manager(packed[0], 2).latest_step() == 3
    assert checkpoint.manager(packed[1], 2).latest_step() is None
    train_packed.train_packed(_variants()[:2], packed)
    _assert_close_trees(_prefix(packed[1]), _prefix(alone))
    np.testing.assert_allclose(list(_losses(packed[1]).values()),
                               list(_losses(alone).values()), rtol=1e-5)


@pytest.mark.parametrize("field,value,named", [
    ("prefix__length", 3, "prefix.length"),
    ("train__batch_size", 2, "train.batch_size"),
    ("prefix__mode", "hidden", "prefix.mode"),
])
def test_incompatible_runs_refused_naming_the_field(tmp_path, field, value, named):
    with pytest.raises(UserError, match=f"cannot be packed.*{named}"):
        train_packed.train_packed([_config(), _config(**{field: value})],
                                  [str(tmp_path / "a"), str(tmp_path / "b")])
    assert not os.path.exists(tmp_path / "a")  # nothing written


def test_fine_tuning_is_not_packed():
    assert train_packed.packing_problem([_config(trainable=r"^base/")])
    assert "seed" in train_packed.packing_problem([_config(), _config(seed=3)])  # random base
    smollm2 = [_config(), _config(seed=3)]
    for config in smollm2:
        config.model.path = "smollm2"
    assert train_packed.packing_problem(smollm2) is None


def test_packed_benchmark_prints_the_ratio_on_the_tiny_model(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "prefix_jax.bench.packed", "--model=tiny",
                        "--sizes=40", "--subsets=2", "--num_steps=2",
                        f"--workroot={tmp_path / 'w'}"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in r.stdout.splitlines() if line.endswith("x |"))
    assert float(row.split("|")[3].strip().rstrip("x")) > 0
    padding = next(line for line in r.stdout.splitlines() if line.startswith("packed programs"))
    assert float(padding.split()[3].rstrip("x")) >= 1.0  # padding never removes positions
    difference = float(r.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1])
    assert difference <= 1e-5


# A packed group of two tiny runs in its own process (killed with SIGKILL by the test).
PACKED_CHILD = """
import sys
from prefix_jax import train_packed
from tests.test_train_packed import _variants
train_packed.train_packed(_variants()[:2], sys.argv[1:3])
"""


def test_packed_group_resumes_after_kill_9(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    packed = [str(tmp_path / "p0"), str(tmp_path / "p1")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", PACKED_CHILD, *packed], cwd=repo, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while checkpoint.manager(packed[1], 2).latest_step() != 3:  # both step-3 saves on disk
        assert time.time() < deadline and child.poll() is None
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not os.path.exists(os.path.join(packed[0], "results.json"))
    train_packed.train_packed(_variants()[:2], packed)  # resumes both from their checkpoints
    alone = str(tmp_path / "alone")
    train.train_and_evaluate(_variants()[1], alone)
    _assert_close_trees(_prefix(packed[1]), _prefix(alone))
    np.testing.assert_allclose(list(_losses(packed[1]).values()),
                               list(_losses(alone).values()), rtol=1e-5)
