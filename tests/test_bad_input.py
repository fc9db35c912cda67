"""User mistakes end with one clear line on stderr, exit status 2, and an untouched workdir."""

import os
import subprocess
import sys

import pytest

from tests.helpers import E2E_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = os.path.join(REPO, "experiments", "e2e_smollm2.py") + ":runlocal"


def _run(workdir, *flags):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "prefix_jax.main", f"--config={RUNLOCAL}",
                           f"--workdir={workdir}", *flags], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


def _snapshot(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


CASES = {
    "unknown-config-field": (["--config.prefix.lenght=3"], "lenght"),
    "negative-prefix-length": (["--config.prefix.length=-1"], "prefix.length=-1"),
    "missing-data-dir": (["--config.data.dir=/nonexistent/e2e"], "/nonexistent/e2e"),
    "missing-model-file": (["--config.model.path=/nonexistent/model.gguf"],
                           "/nonexistent/model.gguf"),
    "unknown-config-arg": (["--config=" + RUNLOCAL + ",prefixlen=3"], "prefixlen"),
    "wrong-type-value": (["--config.train.num_steps=abc"], "num_steps"),
    "bad-mode": (["--config.prefix.mode=banana"], "prefix.mode"),
}


@pytest.mark.parametrize("flags,named", CASES.values(), ids=CASES.keys())
def test_bad_input_one_line_exit_2_workdir_untouched(tmp_path, flags, named):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("keep me")
    before = _snapshot(workdir)
    result = _run(workdir, *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and named in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert _snapshot(workdir) == before


def test_bad_data_row_names_file_and_line(tmp_path):
    data = tmp_path / "e2e"
    data.mkdir()
    for name in ("devset.csv", "testset_w_refs.csv"):
        os.symlink(os.path.join(E2E_DIR, name), data / name)
    (data / "trainset.csv").write_text('mr,ref\n"name[A]",A is a pub.\n"name[B]"\n')
    result = _run(tmp_path / "run", f"--config.data.dir={data}")
    assert result.returncode == 2
    assert f"{data / 'trainset.csv'}:3:" in result.stderr
    assert not (tmp_path / "run").exists()
