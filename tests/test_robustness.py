"""Nothing lost: signals, kill -9, corrupt checkpoints, NaN losses and a full disk.

The reference is an uninterrupted runlocal run; every interrupted run must end with the bitwise
same prefix (same data order, no randomness in the step)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_jax import train
from prefix_jax.errors import UserError
from prefix_jax.training import checkpoint
from tests.helpers import crash_run_after_checkpoint, runlocal_config
from tests.test_bad_input import FAST, REPO, RUNLOCAL, run_main_process

STEPS = ["--config.train.num_steps=40", "--config.train.checkpoint_every=5"]


def final_prefix(workdir):
    return checkpoint.load_state_arrays(str(workdir))["trainable"]["prefix"]


def assert_same_prefix(a, b):
    jax.tree.map(np.testing.assert_array_equal, final_prefix(a), final_prefix(b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    train.train_and_evaluate(reference_config(), str(workdir))
    return workdir


def start_main(workdir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "prefix_jax.main", RUNLOCAL, *FAST, *STEPS,
                             f"--workdir={workdir}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(workdir, proc, timeout=240):
    """Block until the run has finalized at least one checkpoint."""
    deadline = time.time() + timeout
    ckpts = workdir / "checkpoints"
    while time.time() < deadline:
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise TimeoutError("no checkpoint appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_exits_cleanly_then_resumes(tmp_path, reference, sig):
    workdir = tmp_path / "run"
    proc = start_main(workdir)
    wait_for_checkpoint(workdir, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"stopped by {sig.name} at step" in err and "Traceback" not in err
    stopped_at = int(err.split("at step ")[1].split(":")[0])
    assert checkpoint.load_state_arrays(str(workdir))["step"] == stopped_at
    result = run_main_process(RUNLOCAL, *FAST, *STEPS, workdir=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from step {stopped_at}" in result.stdout
    assert_same_prefix(workdir, reference)


def test_kill_9_then_rerun_gives_the_same_prefix(tmp_path, reference):
    workdir = tmp_path / "run"
    for _ in range(2):
        proc = start_main(workdir)
        wait_for_checkpoint(workdir, proc)
        time.sleep(0.5)
        proc.kill()
        proc.communicate()
    result = run_main_process(RUNLOCAL, *FAST, *STEPS, workdir=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_prefix(workdir, reference)


def reference_config():
    return runlocal_config(eval__num_examples=0, eval__eval_untuned=False,
                           train__num_steps=40, train__checkpoint_every=5)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, reference, monkeypatch,
                                                              capsys):
    workdir = tmp_path / "run"
    crash_run_after_checkpoint(reference_config(), str(workdir), 20)

    latest = workdir / "checkpoints" / "20"
    for root, _, files in os.walk(latest / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0garbage")
    capsys.readouterr()
    train.train_and_evaluate(reference_config(), str(workdir))
    out = capsys.readouterr()
    assert f"checkpoint {latest} is unreadable" in out.err
    assert "resumed from step 15" in out.out
    assert any((workdir / "corrupt_checkpoints").iterdir())  # kept, not deleted
    assert_same_prefix(workdir, reference)


def test_nan_loss_stops_names_the_step_and_keeps_the_good_checkpoint(tmp_path):
    """A loss that turns NaN at step 7 (injected after the real step) stops the run there."""
    workdir = tmp_path / "run"

    def poison(real_step):
        def poisoned_step(state, frozen, batch):
            state, metrics = real_step(state, frozen, batch)
            nan = jnp.where(state.step >= 7, jnp.nan, 0.0)
            return state, {**metrics, "train/loss": metrics["train/loss"] + nan}
        return poisoned_step

    config = runlocal_config(eval__num_examples=0, eval__eval_untuned=False,
                             train__checkpoint_every=5)
    with pytest.raises(train.DivergedError, match=r"nan at step 7; last good checkpoint: step 5"):
        train.train_and_evaluate(config, str(workdir), train.Hooks(wrap_step=poison))
    report = json.loads((workdir / "crash_report.json").read_text())
    assert report["step"] == 7 and report["loss"] == "nan"
    assert report["last_good_checkpoint"] == 5 and len(report["recent_losses"]) == 1
    saved = checkpoint.load_state_arrays(str(workdir))
    assert saved["step"] == 5
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved))


def test_full_disk_while_checkpointing_is_one_clear_error(tmp_path):
    workdir = tmp_path / "run"
    config = runlocal_config(eval__num_examples=0, eval__eval_untuned=False)
    real_save = checkpoint.save

    def save(mgr, step, *args):
        if step == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(mgr, step, *args)

    with pytest.raises(UserError, match=r"step-20 checkpoint.*No space left.*previous checkpoint"):
        train.train_and_evaluate(config, str(workdir), train.Hooks(save_checkpoint=save))
    assert checkpoint.load_state_arrays(str(workdir))["step"] == 10


def test_nothing_is_loaded_with_pickle():
    """Checkpoints are orbax/tensorstore + JSON, weights GGUF/safetensors: no pickle anywhere."""
    for root, _, files in os.walk(os.path.join(REPO, "prefix_jax")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    source = f.read()
                for banned in ("import pickle", "torch.load", "allow_pickle=True", "cloudpickle"):
                    assert banned not in source, (name, banned)
