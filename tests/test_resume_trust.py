"""Trust on resume (issue 15, items 1, 2, 3 and 5): a changed experiment is refused before
anything is written, only an intact-failing checkpoint is quarantined and nothing restarts from
zero, one live run per workdir, and no non-finite state is saved or scored."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_jax import configs, sweep, train
from prefix_jax.errors import UserError
from prefix_jax.training import checkpoint, lock, run_identity
from tests.helpers import run_tool, runlocal_config
from tests.test_bad_input import FAST, REPO, RUNLOCAL, run_main_process, snapshot

SHORT = dict(eval__num_examples=0, eval__eval_untuned=False, train__num_steps=4,
             train__checkpoint_every=2, train__log_every=2)


def short_config(**overrides):
    return runlocal_config(**{**SHORT, **overrides})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoints 2 and 4; tests work on copies of it."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    train.train_and_evaluate(short_config(), str(workdir))
    return workdir


@pytest.fixture
def copy(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


# ---- 1. run identity and the run log ---------------------------------------------------------

def test_changed_optimizer_is_refused_by_identity_then_by_structure_and_nothing_moves(copy):
    """The issue's case: resume with optim.grad_clip_norm=0 (another optimizer state tree)."""
    before = snapshot(copy)
    changed = short_config(optim__grad_clip_norm=0.0)
    with pytest.raises(UserError) as refused:
        train.train_and_evaluate(changed, str(copy))
    message = str(refused.value)
    assert "optim.grad_clip_norm: 1.0 -> 0.0" in message
    assert "--allow_changes=optim.grad_clip_norm" in message and "new --workdir" in message
    assert snapshot(copy) == before
    # With the identity check waived, the saved tree itself does not fit: still nothing moves.
    with pytest.raises(UserError, match=r"checkpoints/4 does not fit this run's state \(.*"
                                        r"opt_state/inner_states/train"):
        train.train_and_evaluate(changed, str(copy), allow_changes=["optim.grad_clip_norm"])
    assert snapshot(copy) == before


def test_another_experiment_lists_every_differing_field(copy):
    before = snapshot(copy)
    other = short_config(prefix__placement="infix", optim__lr=0.5, data__train_examples=128)
    with pytest.raises(UserError, match="3 field") as refused:
        train.train_and_evaluate(other, str(copy))
    for line in ("optim.lr: 0.1 -> 0.5", "prefix.placement: 'prefix' -> 'infix'",
                 "data.train_examples: 256 -> 128"):
        assert line in str(refused.value)
    assert snapshot(copy) == before


def test_allowed_change_resumes_extends_and_appends_to_the_run_log(copy, capsys):
    more = short_config(optim__lr=0.05, train__num_steps=6)
    result = train.train_and_evaluate(more, str(copy), allow_changes=["optim.lr"])
    out = capsys.readouterr().out
    assert "resumed from step 4" in out and "optim.lr: 0.1 -> 0.05" in out
    assert result["step"] == 6
    log = [json.loads(line) for line in (copy / run_identity.RUN_LOG).read_text().splitlines()]
    assert [r["resumed_from"] for r in log] == [None, 4]
    assert log[1]["accepted_changes"] == ["optim.lr: 0.1 -> 0.05"]
    assert log[1]["config"]["optim"]["lr"] == 0.05 and log[0]["config"]["optim"]["lr"] == 0.1
    for key in ("time", "argv", "host", "devices", "git_commit"):
        assert key in log[1]
    assert set(run_identity.LIBRARIES) < set(log[1]["versions"])
    assert json.loads((copy / "config.json").read_text())["optim"]["lr"] == 0.05
    # the new identity is what the next checkpoints record: the same command resumes again
    meta = checkpoint.load_latest_arrays(str(copy))[2]
    assert meta["identity"]["optim.lr"] == 0.05


def test_allow_changes_names_must_be_fields(copy):
    with pytest.raises(UserError, match=r"'optim\.lrr', which is no config field"):
        train.train_and_evaluate(short_config(), str(copy), allow_changes=["optim.lrr"])


def test_resumable_fields_do_not_change_the_identity():
    a = short_config()
    b = short_config(train__num_steps=9, train__log_every=3, eval__num_examples=7,
                     mesh__data=1, model__remat="full")
    assert run_identity.identity(a) == run_identity.identity(b)
    assert run_identity.identity(a) != run_identity.identity(short_config(data__max_len=200))
    # results also depend on the steps and the evaluation, not on the layout
    assert run_identity.results_identity(a) != run_identity.results_identity(b)
    assert run_identity.results_identity(a) == run_identity.results_identity(
        short_config(train__log_every=3, mesh__data=1))


def test_a_field_added_at_its_neutral_value_keeps_old_runs_resumable_and_done(copy,
                                                                              monkeypatch):
    """A checkpoint written before a config field existed: refused while the field is not
    registered; resumed once ADDED_FIELDS names the value that reproduces the old code; still
    refused at any other value. The results digest of older runs matches likewise."""
    field = "optim.final_lr_fraction"
    for step in ("2", "4"):  # as if written by code without the field
        path = copy / "checkpoints" / step / "meta" / "metadata"
        meta = json.loads(path.read_text())
        del meta["identity"][field]
        path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"optim\.final_lr_fraction: '\(absent\)' -> 0\.0"):
        train.train_and_evaluate(short_config(), str(copy))
    monkeypatch.setitem(run_identity.ADDED_FIELDS, field, 0.0)
    with pytest.raises(UserError, match=r"optim\.final_lr_fraction: '\(absent\)' -> 0\.5"):
        train.train_and_evaluate(short_config(optim__final_lr_fraction=0.5), str(copy))
    train.train_and_evaluate(short_config(), str(copy))  # resumes the finished run
    old = {k: v for k, v in run_identity.flatten(short_config()).items() if k != field}
    assert run_identity.results_identity(short_config()) == run_identity.results_identity(old)
    assert run_identity.results_identity(short_config(optim__final_lr_fraction=0.5)) != \
        run_identity.results_identity(old)


def test_legacy_checkpoint_is_checked_against_config_json(copy, capsys):
    """Checkpoints written before identities: config.json stands in, else a warning."""
    for step in ("2", "4"):
        path = copy / "checkpoints" / step / "meta" / "metadata"
        meta = json.loads(path.read_text())
        del meta["identity"]
        path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"optim\.lr: 0\.1 -> 0\.5"):
        train.train_and_evaluate(short_config(optim__lr=0.5), str(copy))
    (copy / "config.json").unlink()
    train.train_and_evaluate(short_config(), str(copy))
    captured = capsys.readouterr()
    assert "records no experiment identity" in captured.err
    assert "resumed from step 4" in captured.out


# ---- 2. corruption vs incompatibility --------------------------------------------------------

def test_every_checkpoint_corrupt_never_restarts_from_zero(copy, capsys):
    (copy / "checkpoints" / "4" / checkpoint.COMMIT_MARKER).unlink()  # a save never finished
    (copy / "checkpoints" / "2" / "state" / "_METADATA").write_text("{trunc")
    results = (copy / "results.json").read_bytes()
    for _ in range(2):  # and the rerun after that does not start over either
        with pytest.raises(UserError, match=r"no checkpoint in .* is intact"):
            train.train_and_evaluate(short_config(), str(copy))
        assert (copy / "results.json").read_bytes() == results
        assert not (copy / run_identity.RUN_LOG).read_text().count("\n") > 1
    err = capsys.readouterr().err
    assert "no commit_success.txt" in err and "state/_METADATA is unreadable" in err
    assert len(os.listdir(copy / checkpoint.QUARANTINE)) == 2


def test_intact_but_unreadable_checkpoint_is_an_error_not_a_quarantine(copy):
    """Array bytes orbax cannot read behind intact metadata (as another orbax version's could
    be): one error naming the cause, nothing moved."""
    for root, _, files in os.walk(copy / "checkpoints" / "4" / "state"):
        for name in files:
            if os.path.basename(root) == "d" and "ocdbt.process_" in root:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"\0garbage")
    before = snapshot(copy)
    with pytest.raises(UserError, match="is intact and fits this run but could not be read"):
        train.train_and_evaluate(short_config(), str(copy))
    assert snapshot(copy) == before


# ---- 3. the workdir lock ---------------------------------------------------------------------

def test_lock_refuses_a_second_holder_and_is_deleted_on_release(tmp_path):
    held = lock.acquire(str(tmp_path / "w"))
    with pytest.raises(UserError, match=rf"in use by a running training run \(pid {os.getpid()}"
                                        r" on host .* since "):
        lock.acquire(str(tmp_path / "w"))
    held.release()
    assert not (tmp_path / "w" / lock.LOCK_NAME).exists()
    lock.acquire(str(tmp_path / "w")).release()


def test_lock_of_a_killed_holder_is_taken_over_with_a_warning(tmp_path, capsys):
    workdir = tmp_path / "w"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from prefix_jax.training import lock; "
         "lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(workdir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid}"):
        lock.acquire(str(workdir))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    held = lock.acquire(str(workdir))
    assert f"took over the lock {workdir / lock.LOCK_NAME}" in capsys.readouterr().err
    held.release()


def test_remote_style_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, capsys):
    """The file-only lock used for gs:// workdirs (run here on a local path)."""
    path = tmp_path / lock.LOCK_NAME
    held = lock._acquire_remote(str(tmp_path))
    with pytest.raises(UserError, match=r"delete .* and rerun"):
        lock._acquire_remote(str(tmp_path))
    held.release()
    assert not path.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    record = json.loads(json.dumps(lock._holder_record()))
    path.write_text(json.dumps({**record, "pid": int(dead)}))
    lock._acquire_remote(str(tmp_path)).release()
    assert "no longer running" in capsys.readouterr().err
    path.write_text(json.dumps({**record, "host": "another-host"}))
    with pytest.raises(UserError, match="another-host"):
        lock._acquire_remote(str(tmp_path))


def test_second_run_on_a_live_workdir_fails_fast_and_the_first_finishes(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # The first run must outlive the second's start-up (a fresh interpreter, JAX and the model):
    # enough steps that, once it holds the lock, it is still training when the second arrives.
    steps = ["--config.train.num_steps=60", "--config.train.checkpoint_every=30"]
    first = subprocess.Popen([sys.executable, "-m", "prefix_jax.main", RUNLOCAL, *FAST, *steps,
                              f"--workdir={workdir}"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock_file = workdir / lock.LOCK_NAME
    deadline = time.time() + 240
    while not (lock_file.exists() and lock_file.read_text()):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.2)
    second = run_main_process(RUNLOCAL, *FAST, *steps, workdir=workdir)
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"pid {first.pid} on host" in errors[0], second.stderr[-2000:]
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert json.loads((workdir / "results.json").read_text())["step"] == 60
    assert not lock_file.exists()


# ---- 5. nothing non-finite is saved or scored ------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("lr", float("inf")), ("lr", float("nan")), ("lr", 0.0), ("b1", 1.0), ("b2", -0.1),
    ("eps", 0.0), ("grad_clip_norm", float("inf")), ("grad_clip_norm", -1.0),
    ("weight_decay", float("nan")), ("warmup_steps", -1)])
def test_optimizer_values_are_validated(field, value):
    with pytest.raises(UserError, match=f"optim.{field}="):
        configs.validate(short_config(**{f"optim__{field}": value}))


def test_lr_inf_is_one_error_line_and_no_workdir(tmp_path, capsys):
    status, _, err = run_tool("main", RUNLOCAL, "--config.optim.lr=inf",
                              f"--workdir={tmp_path / 'run'}", capsys=capsys)
    assert status == 2 and err.count("error: ") == 1 and "optim.lr=inf" in err
    assert not (tmp_path / "run").exists()


def test_a_state_poisoned_on_the_last_step_is_never_saved_or_scored(tmp_path):
    """The loss of step 4 is finite (computed before the update); the updated state is not."""
    def poison(real_step):
        def poisoned_step(state, frozen, batch):
            state, metrics = real_step(state, frozen, batch)
            nan = jnp.where(state.step >= 4, jnp.nan, 0.0)
            trainable = jax.tree.map(lambda x: x + nan, state.trainable)
            return state.replace(trainable=trainable), metrics
        return poisoned_step

    workdir = tmp_path / "run"
    with pytest.raises(train.DivergedError,
                       match=r"NaN or Inf after step 4 \(refusing to save it\); last good "
                             r"checkpoint: step 2"):
        train.train_and_evaluate(short_config(), str(workdir), train.Hooks(wrap_step=poison))
    assert not (workdir / "results.json").exists()
    report = json.loads((workdir / "crash_report.json").read_text())
    assert report["step"] == 4 and report["last_good_checkpoint"] == 2
    saved = checkpoint.load_state_arrays(str(workdir))
    assert saved["step"] == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved))


# ---- sweep: done only with this entry's results ----------------------------------------------

def test_sweep_counts_a_run_done_only_for_its_own_config(tmp_path):
    run = sweep.Run(0, "", {}, "base", run_identity.results_identity(short_config()))
    workdir = tmp_path / "base"
    workdir.mkdir()
    assert sweep.finished(str(workdir), run) == (False, "no results.json")
    (workdir / "results.json").write_text('{"eval/bleu": 1.0, "st')  # torn
    assert not sweep.finished(str(workdir), run)[0]
    (workdir / "results.json").write_text(json.dumps({"step": 4, "results_identity": "0" * 16}))
    assert sweep.finished(str(workdir), run) == (
        False, "results.json is of another config of this entry")
    (workdir / "results.json").write_text(json.dumps(
        {"step": 4, "results_identity": run.results_identity}))
    assert sweep.finished(str(workdir), run)[0]
