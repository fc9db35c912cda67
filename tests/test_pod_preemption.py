"""A pod stops together: two processes on 127.0.0.1 (jax.distributed on CPU), SIGTERM to one of
them only. Both must save the same step and exit as stopped (128 + SIGTERM), and rerunning both
must end with the bitwise prefix of an uninterrupted two-process run."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from prefix_jax.training import checkpoint
from tests.test_bad_input import FAST, REPO, RUNLOCAL
from tests.test_sharding import _free_port

CHECK_EVERY = 4
FLAGS = [RUNLOCAL, *FAST, "--config.train.num_steps=20", "--config.train.checkpoint_every=5",
         "--config.train.log_every=5", f"--config.distributed.stop_check_every={CHECK_EVERY}"]


def start_pod(workdir) -> list[subprocess.Popen]:
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return [subprocess.Popen(
        [sys.executable, "-m", "prefix_jax.main", *FLAGS, f"--workdir={workdir}",
         f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(2)]


def finish(procs) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process, once it ended."""
    outputs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, *out) for p, out in zip(procs, outputs)]


def prefix(workdir):
    return checkpoint.load_state_arrays(str(workdir))["trainable"]["prefix"]


def test_sigterm_to_one_host_stops_both_at_the_same_step_then_resumes_bitwise(tmp_path):
    reference = start_pod(tmp_path / "reference")
    interrupted = start_pod(tmp_path / "run")
    first = tmp_path / "run" / "checkpoints" / "5"
    deadline = time.time() + 600
    while not first.exists() and all(p.poll() is None for p in interrupted):
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.05)
    interrupted[1].send_signal(signal.SIGTERM)  # process 0 (the logs' writer) is not signalled
    stopped = finish(interrupted)
    for status, _, err in stopped:
        assert status == 128 + signal.SIGTERM, err[-3000:]
        assert "Traceback" not in err
    steps = {int(re.search(r"stopped by SIGTERM at step (\d+)", err).group(1))
             for _, _, err in stopped}
    assert len(steps) == 1, steps  # both processes saved the same step
    step = steps.pop()
    assert step % CHECK_EVERY == 0 and step < 20
    assert checkpoint.load_state_arrays(str(tmp_path / "run"))["step"] == step

    resumed = finish(start_pod(tmp_path / "run"))
    for status, _, err in resumed + finish(reference):
        assert status == 0, err[-3000:]
    assert f"resumed from step {step}" in resumed[0][1]
    jax.tree.map(np.testing.assert_array_equal, prefix(tmp_path / "run"),
                 prefix(tmp_path / "reference"))
