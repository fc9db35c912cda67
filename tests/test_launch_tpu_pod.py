"""scripts/launch_tpu_pod.sh --dry_run: the gcloud commands it would run, and nothing run."""

import os
import re
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
    launch_dir = re.search(r"\$HOME/prefix_jax_launches/[\w-]+", setup).group(0)
    assert (f"pip install -q -c {launch_dir}/prefix_jax/constraints.txt "
            f"-e {launch_dir}/prefix_jax '\\''jax[tpu]'\\''") in setup
    assert "gcsfuse --implicit-dirs bkt $HOME/bucket" in setup
    assert start.startswith(f"gcloud compute tpus tpu-vm ssh pod1 {where} --command ")
    for piece in ("python -m prefix_jax.main --config=experiments/e2e_smollm2.py",
                  "--config.distributed.initialize=on",
                  "--workdir=$HOME/bucket/runs/r1", "--config.train.batch_size=64"):
        assert piece in start
    # the data by a digest of its contents, outside the launch directories: a relaunch passes
    # the same data.dir, which the run identity checks on resume
    assert re.search(r"--config.data.dir=\$HOME/prefix_jax_data/[0-9a-f]{16}/e2e ", start)
    assert "dry run: nothing was executed" in r.stdout
    assert not os.path.exists(re.search(r"-o (\S+)", archive).group(1))


def test_missing_or_bad_arguments_exit_2_with_one_error_line():
    for args, named in ((["--zone", "z", "--bucket", "gs://b"], "--tpu"),
                        (["--tpu", "t", "--zone", "z", "--bucket", "s3://b"], "gs://"),
                        (["--tpu", "t", "--zone", "z", "--bucket", "gs://b", "--nope"], "--nope")):
        r = launch(*args, "--dry_run")
        assert r.returncode == 2
        assert r.stderr.startswith("error: ") and named in r.stderr.splitlines()[0]


# A fake pod of one worker, on this machine: `gcloud ... ssh --command CMD` runs CMD with bash
# in a fake $HOME (as the worker's login shell would), `scp` has nothing to copy (the archives
# are already in /tmp here), and `python3 -m venv` makes a venv whose python records its
# arguments (NUL-separated) instead of training. `id` is a trap: run, it leaves a file.
FAKE_GCLOUD = r"""#!/bin/bash
while [ $# -gt 0 ]; do
  if [ "$1" = --command ]; then exec bash -c "$2"; fi
  shift
done
"""
FAKE_PYTHON3 = r"""#!/bin/bash
[ "$1 $2" = "-m venv" ] || exit 64
mkdir -p "$3/bin"
printf '#!/bin/bash\necho "$*" >> "$HOME/pip.log"\n' > "$3/bin/pip"
printf '#!/bin/bash\nprintf "%%s\\0" "$@" > "$HOME/argv"\nexit ${FAKE_STATUS:-0}\n' \
  > "$3/bin/python"
chmod +x "$3/bin/pip" "$3/bin/python"
"""
FAKE_TOOLS = {"gcloud": FAKE_GCLOUD, "python3": FAKE_PYTHON3,
              "mountpoint": "#!/bin/bash\nexit 1\n", "gcsfuse": "#!/bin/bash\nexit 0\n",
              "id": '#!/bin/bash\ntouch "$HOME/id_was_run"\n'}


def fake_pod(tmp_path):
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    for name, text in FAKE_TOOLS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, home


def launch_on(tmp_path, *args, status=0):
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "STARTUP_CHECK_S": "1",
           "FAKE_STATUS": str(status)}
    return subprocess.run(["bash", SCRIPT, "--tpu", "pod1", "--zone", "z", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_user_values_arrive_intact_and_nothing_in_them_runs(tmp_path):
    _, home = fake_pod(tmp_path)
    run_name = "x;id $(id) `id` 'q' \"d\" & a b"
    extra = "--config.data.prompt=a b; id|id"
    r = launch_on(tmp_path, "--bucket", "gs://bkt/my runs", "--run", run_name, "--", extra)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (home / "id_was_run").exists()
    argv = (home / "argv").read_text().split("\0")[:-1]
    assert argv[:2] == ["-m", "prefix_jax.main"]
    assert f"--workdir={home}/bucket/my runs/{run_name}" in argv
    assert extra in argv and "--config=experiments/e2e_smollm2.py" in argv
    (data_flag,) = [a for a in argv if a.startswith("--config.data.dir=")]
    assert os.path.isfile(os.path.join(data_flag.split("=", 1)[1], "trainset.csv"))
    pip = (home / "pip.log").read_text()
    assert "-c " in pip and "constraints.txt" in pip  # pinned installs
    assert f"launched {run_name} on pod1" in r.stdout


def test_a_failing_remote_start_is_not_reported_as_launched(tmp_path):
    fake_pod(tmp_path)
    r = launch_on(tmp_path, "--bucket", "gs://bkt/runs", "--run", "r1", status=2)
    assert r.returncode != 0
    assert "launched" not in r.stdout and "prefix_jax.main failed on" in r.stdout


def test_a_relaunch_keeps_the_files_of_the_running_job(tmp_path):
    _, home = fake_pod(tmp_path)
    for run_name in ("first", "second"):
        r = launch_on(tmp_path, "--bucket", "gs://bkt/runs", "--run", run_name)
        assert r.returncode == 0, r.stderr
    launches = sorted((home / "prefix_jax_launches").iterdir())
    assert len(launches) == 2  # one directory per launch, the first one untouched
    for launch in launches:
        assert (launch / "prefix_jax" / "setup.cfg").is_file()
        assert (launch / "prefix_jax" / ".venv" / "bin" / "python").is_file()
    (data,) = (home / "prefix_jax_data").iterdir()  # one copy of the same data, kept
    assert (data / "e2e" / "trainset.csv").is_file()


def test_constraints_pin_every_requirement_within_setup_cfg():
    import configparser

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    wanted = [Requirement(line) for line in parser["options"]["install_requires"].splitlines()
              if line.strip() and not line.strip().startswith("#")]
    with open(os.path.join(REPO, "constraints.txt")) as f:
        pins = dict(line.strip().split("==") for line in f
                    if line.strip() and not line.startswith("#"))
    pins = {canonicalize_name(k): v for k, v in pins.items()}
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} of setup.cfg is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside setup.cfg's {req}"
