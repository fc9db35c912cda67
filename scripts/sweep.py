r"""Run an experiment file's SWEEP: one `prefix_jax.main` run per entry, each in its own workdir.

  python scripts/sweep.py experiments/e2e_smollm2.py --root runs/sweeps --dry_run
  python scripts/sweep.py experiments/e2e_smollm2.py --root runs/sweeps --filter length
  python scripts/sweep.py experiments/e2e_smollm2.py --arg runlocal --root /tmp/sweeps
  python scripts/sweep.py experiments/e2e_smollm2.py --tpu pod1 --zone us-central2-b \
      --bucket gs://bkt/sweeps                      # prints one pod launch per run

Entry i (see experiments/sweeps.py for the SWEEP format) runs as
  python -m prefix_jax.main --config=FILE[:ARG] --workdir=ROOT/EXPERIMENT/SLUG --config.a.b=V ...
where EXPERIMENT is the file's name (plus `-ARG` with --arg) and SLUG names the overrides
(`prefix.length=5`, `data.train_examples=50,data.subsample_seed=3,seed=1`; `base` for none).
Every entry is built and validated before anything runs. Runs go one after another; a run whose
workdir has results.json is skipped, so rerunning the command resumes the sweep (an interrupted
run resumes from its checkpoint). --filter REGEX keeps the entries whose group name or SLUG it
matches. Then: python scripts/compare.py ROOT/EXPERIMENT/* --out DIR.
Exit status: 0 when every run is done, 1 when a run failed, 2 for a bad flag or SWEEP entry.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from prefix_jax import cli  # noqa: E402


def config_flag(path: str, arg: str | None) -> str:
    return f"--config={path}" + (f":{arg}" if arg is not None else "")


def main() -> None:
    parser = cli.Parser(prog="scripts/sweep.py", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="an experiment file with a SWEEP list")
    parser.add_argument("--arg", default=None, help="get_config's arg, as in --config=FILE:ARG")
    parser.add_argument("--root", default=None, help="runs go to ROOT/EXPERIMENT/SLUG")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument("--filter", default=None, metavar="REGEX",
                        help="only entries whose group name or workdir slug matches")
    parser.add_argument("--stop_on_error", action="store_true",
                        help="stop at the first failed run (default: run the rest)")
    pod = parser.add_argument_group("TPU pod (prints scripts/launch_tpu_pod.sh commands)")
    pod.add_argument("--tpu", default=None, metavar="NAME", help="the pod slice's name")
    pod.add_argument("--zone", default=None)
    pod.add_argument("--project", default=None)
    pod.add_argument("--bucket", default=None,
                     help="gs://BUCKET/DIR: runs go to DIR/EXPERIMENT/SLUG in the bucket")
    args = parser.parse_args()
    if args.tpu is None and not args.root:
        cli.fail("--root is required: the directory that holds the sweep's workdirs")
    if args.tpu is not None:
        if not args.zone:
            cli.fail("--tpu needs --zone (the pod's zone, e.g. us-central2-b)")
        if not (args.bucket or "").startswith("gs://"):
            cli.fail("--tpu needs --bucket gs://BUCKET/DIR: the pod's runs write there")
    try:
        pattern = re.compile(args.filter) if args.filter is not None else None
    except re.error as e:
        cli.fail(f"--filter {args.filter!r} is not a regular expression: {e}")

    from prefix_jax import sweep

    runs = sweep.expand(args.config, args.arg)  # every entry validated before anything runs
    if pattern is not None:
        runs = [r for r in runs if pattern.search(r.group) or pattern.search(r.slug)]
        if not runs:
            cli.fail(f"--filter {args.filter!r} matches no SWEEP entry (group names and "
                     "slugs; --dry_run without --filter lists them)")
    experiment = sweep.experiment_name(args.config, args.arg)
    if args.tpu is not None:
        print_pod_launches(runs, args, experiment)
    else:
        run_locally(runs, args, os.path.join(args.root, experiment))


def print_pod_launches(runs, args, experiment: str) -> None:
    """One launch_tpu_pod.sh line per run (run them one at a time: each uses the whole pod)."""
    config = os.path.relpath(os.path.abspath(args.config), REPO)
    if config.startswith(".."):
        cli.fail(f"{args.config} is outside this checkout; the pod gets only the checkout "
                 "(git archive of HEAD), so put the experiment file in experiments/")
    launcher = os.path.relpath(os.path.join(REPO, "scripts", "launch_tpu_pod.sh"))
    where = ["--tpu", args.tpu, "--zone", args.zone]
    if args.project:
        where += ["--project", args.project]
    bucket = f"{args.bucket.rstrip('/')}/{experiment}"
    config_arg = config + (f":{args.arg}" if args.arg is not None else "")
    for run in runs:
        print(shlex.join([launcher, *where, "--bucket", bucket, "--config", config_arg,
                          "--run", run.slug, "--", *run.flags()]))
    print(f"# {len(runs)} runs: launch one at a time (each uses every worker of {args.tpu}); "
          f"workdirs {bucket}/SLUG")


def run_locally(runs, args, root: str) -> None:
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    done = skipped = 0
    failed: list[str] = []
    for n, run in enumerate(runs, 1):
        workdir = os.path.join(root, run.slug)
        command = [sys.executable, "-m", "prefix_jax.main", config_flag(args.config, args.arg),
                   f"--workdir={workdir}", *run.flags()]
        finished = os.path.exists(os.path.join(workdir, "results.json"))
        if args.dry_run:
            print(("# done, would skip: " if finished else "") + shlex.join(command))
            skipped += finished
            continue
        label = f"[{n}/{len(runs)}] {run.slug}"
        if finished:
            print(f"{label}: skipped (results.json exists)", flush=True)
            skipped += 1
            continue
        print(f"{label}: {shlex.join(command)}", flush=True)
        started = time.perf_counter()
        status = subprocess.run(command, env=env).returncode
        if status == 0:
            done += 1
            print(f"{label}: done in {time.perf_counter() - started:.0f} s", flush=True)
        else:
            failed.append(run.slug)
            print(f"{label}: FAILED (exit status {status})", flush=True)
            if args.stop_on_error:
                break
    if args.dry_run:
        print(f"# dry run: {len(runs)} runs, {skipped} already done (would be skipped), "
              f"under {root}")
        return
    left = len(runs) - done - skipped - len(failed)
    print(f"sweep {os.path.basename(root)}: {done} done, {skipped} skipped, {len(failed)} "
          f"failed" + (f", {left} not started (--stop_on_error)" if left else "")
          + f" of {len(runs)} under {root}" + (f"; failed: {' '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
