"""scripts/launch_tpu_pod.sh --dry_run: the gcloud commands it would run, and nothing run."""

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "launch_tpu_pod.sh")


def launch(*args, path=None):
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_dry_run_prints_the_pod_commands(tmp_path):
    # gcloud is not installed here: a dry run must not need it (nothing is executed)
    r = launch("--tpu", "pod1", "--zone", "us-central2-b", "--project", "proj",
               "--bucket", "gs://bkt/runs", "--run", "r1", "--dry_run", "--",
               "--config.train.batch_size=64")
    assert r.returncode == 0, r.stderr
    commands = [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == 5
    archive, data, scp, setup, start = commands
    assert archive.startswith("git -C ") and "archive" in archive and "HEAD" in archive
    assert "shared/data e2e" in data
    where = "--zone us-central2-b --worker=all --project proj"
    assert scp.startswith("gcloud compute tpus tpu-vm scp ") and "pod1:/tmp/" in scp
    assert where in scp
    assert setup.startswith(f"gcloud compute tpus tpu-vm ssh pod1 {where} --command ")
    assert "pip install -q -e $HOME/prefix_jax '\\''jax[tpu]'\\''" in setup
    assert "gcsfuse --implicit-dirs bkt $HOME/bucket" in setup
    assert start.startswith(f"gcloud compute tpus tpu-vm ssh pod1 {where} --command ")
    for piece in ("python -m prefix_jax.main --config=experiments/e2e_smollm2.py",
                  "--config.data.dir=$HOME/data/e2e", "--config.distributed.initialize=on",
                  "--workdir=$HOME/bucket/runs/r1", "--config.train.batch_size=64"):
        assert piece in start
    assert "dry run: nothing was executed" in r.stdout
    assert not os.path.exists("/tmp/prefix_jax-r1.tar.gz")


def test_missing_or_bad_arguments_exit_2_with_one_error_line():
    for args, named in ((["--zone", "z", "--bucket", "gs://b"], "--tpu"),
                        (["--tpu", "t", "--zone", "z", "--bucket", "s3://b"], "gs://"),
                        (["--tpu", "t", "--zone", "z", "--bucket", "gs://b", "--nope"], "--nope")):
        r = launch(*args, "--dry_run")
        assert r.returncode == 2
        assert r.stderr.startswith("error: ") and named in r.stderr.splitlines()[0]
