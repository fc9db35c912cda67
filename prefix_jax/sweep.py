r"""Run an experiment file's SWEEP: one `prefix_jax.main` run per entry, each in its own workdir.

  python -m prefix_jax.sweep --config=experiments/e2e_smollm2.py --root=runs/sweeps --dry_run
  python -m prefix_jax.sweep --config=experiments/e2e_smollm2.py --root=runs/sweeps --filter=length
  python -m prefix_jax.sweep --config=experiments/e2e_smollm2.py:runlocal --root=/tmp/sweeps
  python -m prefix_jax.sweep --config=experiments/e2e_smollm2.py --tpu=pod1 \
      --zone=us-central2-b --bucket=gs://bkt/sweeps     # prints one pod launch per run

Entry i (see experiments/sweeps.py for the SWEEP format) runs as
  python -m prefix_jax.main --config=FILE[:ARG] --workdir=ROOT/EXPERIMENT/SLUG --config.a.b=V ...
where EXPERIMENT is the file's name (plus `-ARG` with an ARG) and SLUG names the overrides
(`prefix.length=5`, `data.train_examples=50,data.subsample_seed=3,seed=1`; `base` for none).
Every entry is built and validated before anything runs. Runs go one after another; a run whose
workdir has the results of exactly this entry's config (results.json records a digest of what
the results depend on, run_identity.results_identity) is skipped, so rerunning the command
resumes the sweep (an interrupted run resumes from its checkpoint; a changed entry reruns, and
is refused by the run itself if its checkpoints are of another experiment).
--filter REGEX keeps the entries whose group name or SLUG it matches. Then:
python -m prefix_jax.compare --workdir='ROOT/EXPERIMENT/*' --out=DIR.
Exit status: 0 when every run is done, 1 when a run failed, 2 for a bad flag or SWEEP entry,
130 / 143 when stopped by SIGINT / SIGTERM.
With --pack (the default), entries that differ only in per-run fields (seed, optim, schedule
length, data subset, init: train_packed.PER_RUN_FIELDS) train together, up to --pack_max at a
time, as one `prefix_jax.sweep --run_packed=I,J,...` program (SWEEP positions) sharing the
frozen base; each still gets its own ordinary workdir. The sweep packs only entries of the
same `train.num_steps` (train_packed itself accepts mixed lengths, but a run that is done
still rides through every remaining vmapped step, so mixing lengths wastes its compute).
Entries that train the base's weights run alone.
Ctrl-C or SIGTERM is passed on to the running run, which saves a checkpoint and exits; the
sweep then stops with status 128 + the signal.

The library half (`expand`, `slug`, ...) turns the SWEEP into runs: each entry's overrides
applied and validated, its workdir name (a readable slug of the overrides) and its
`prefix_jax.main` flags. The SWEEP contract is documented in experiments/sweeps.py and
experiments/README.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from types import ModuleType
from typing import Any

import ml_collections
from absl import flags

from prefix_jax import cli, configs
from prefix_jax.errors import UserError
from prefix_jax.training import run_identity
from prefix_jax.training import workdir as workdir_io

FLAGS = cli.flag_values()
_CONFIG = flags.DEFINE_string("config", None, "An experiment file with a SWEEP list, and the "
                              "arg of its get_config: FILE[:ARG], as prefix_jax.main takes it.",
                              flag_values=FLAGS)
_ROOT = flags.DEFINE_string("root", None, "Runs go to ROOT/EXPERIMENT/SLUG.", flag_values=FLAGS)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands only.", flag_values=FLAGS)
_FILTER = flags.DEFINE_string("filter", None, "Only entries whose group name or workdir slug "
                              "this regex matches.", flag_values=FLAGS)
_PACK = flags.DEFINE_bool("pack", True, "Train compatible entries (same shapes and base; see "
                          "prefix_jax.train_packed) together in one program, each in its own "
                          "workdir; --pack=false runs every entry alone.", flag_values=FLAGS)
_PACK_MAX = flags.DEFINE_integer("pack_max", 8, "At most this many runs in one packed program "
                                 "(memory grows with it).", flag_values=FLAGS)
_RUN_PACKED = flags.DEFINE_list("run_packed", None, "Internal to a local sweep (printed by "
                                "--dry_run): train these entries (their positions in SWEEP) as "
                                "one packed program, in this process.", flag_values=FLAGS)
_STOP_ON_ERROR = flags.DEFINE_bool("stop_on_error", False, "Stop at the first failed run "
                                   "(default: run the rest).", flag_values=FLAGS)
# A TPU pod: print one scripts/launch_tpu_pod.sh command per run instead of running.
_TPU = flags.DEFINE_string("tpu", None, "TPU pod: the pod slice's name (prints launch lines).",
                           flag_values=FLAGS)
_ZONE = flags.DEFINE_string("zone", None, "TPU pod: its zone.", flag_values=FLAGS)
_PROJECT = flags.DEFINE_string("project", None, "TPU pod: its project.", flag_values=FLAGS)
_BUCKET = flags.DEFINE_string("bucket", None, "TPU pod: gs://BUCKET/DIR; runs go to "
                              "DIR/EXPERIMENT/SLUG in the bucket.", flag_values=FLAGS)

GROUP_KEY = "name"  # an entry's group ("length", "low_data", ...): not a config field
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")  # '=' and ',' join the pieces of a slug
_MAX_SLUG = 120  # well under the 255-byte file name limit, with room for a hash


@dataclasses.dataclass(frozen=True)
class Run:
    index: int  # position in SWEEP
    group: str  # the entry's GROUP_KEY, or ""
    overrides: dict[str, Any]  # dotted config path -> value
    slug: str  # the workdir's name
    results_identity: str = ""  # what its results depend on (run_identity.results_identity)

    def flags(self) -> list[str]:
        """The overrides as `prefix_jax.main` flags."""
        return [f"--config.{path}={format_flag_value(v)}" for path, v in self.overrides.items()]


def load_experiment(path: str) -> ModuleType:
    """Import an experiment file (`experiments/NAME.py`) by its path."""
    if not os.path.isfile(path) or not path.endswith(".py"):
        raise UserError(f"{path}: not an experiment file; give a path like "
                        "experiments/e2e_smollm2.py")
    name = "_sweep_experiment_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        raise UserError(f"{path} imports {e.name!r}, which is not importable from "
                        f"{os.getcwd()}; run from the checkout that holds it") from None
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"{path}: has no get_config(arg) function")
    return module


def get_config(module: ModuleType, arg: str | None) -> ml_collections.ConfigDict:
    """`get_config` called as `--config=FILE[:ARG]` calls it (no argument without an ARG)."""
    return module.get_config() if arg is None else module.get_config(arg)


def entries(module: ModuleType, path: str) -> list[dict[str, Any]]:
    sweep = getattr(module, "SWEEP", None)
    if sweep is None:
        raise UserError(f"{path}: has no SWEEP list; add one (see experiments/sweeps.py)")
    if not isinstance(sweep, (list, tuple)) or not all(isinstance(e, dict) for e in sweep):
        raise UserError(f"{path}: SWEEP must be a list of dicts of config overrides")
    return list(sweep)


def overrides_of(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != GROUP_KEY}


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Set each dotted path of the (locked) config as `--config.PATH=VALUE` would; UserError
    for a path that names no field or a value of the wrong type."""
    for path, value in overrides.items():
        if not isinstance(path, str) or not path:
            raise UserError(f"key {path!r} is not a dotted config path")
        *parents, leaf = path.split(".")
        node = config
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise UserError(f"unknown config field '{'.'.join(parents[:i + 1])}' "
                                f"(in '{path}')")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise UserError(f"unknown config field '{path}'")
        if isinstance(value, list):
            value = tuple(value)  # configs hold sequences as tuples (hashable, flag-parsable)
        try:
            node[leaf] = value
        except TypeError:
            raise UserError(f"{path}={value!r}: the field's type is "
                            f"{type(node[leaf]).__name__}, not {type(value).__name__}") from None


def build_config(module: ModuleType, arg: str | None,
                 overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """The experiment's config with one entry's overrides, validated."""
    config = get_config(module, arg)
    apply_overrides(config, overrides)
    configs.validate(config)
    return config


def format_flag_value(value: Any) -> str:
    """A value as absl/ml_collections parse it back from `--config.x=VALUE`."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        value = tuple(value)
    return repr(value)  # ints, floats, bools ('True'), tuples and None: literal syntax


def slug(overrides: dict[str, Any]) -> str:
    """A workdir name for the overrides: `prefix.length=5`, `data.train_examples=50,seed=1`.

    Readable and stable (the same overrides always give the same name, whatever else is in the
    sweep, so a rerun finds its runs); only [A-Za-z0-9._+=,-]; where a value needed changing to
    be safe (or the name is long), a hash of the exact overrides keeps names unique."""
    if not overrides:
        return "base"
    pieces, changed = [], False
    for path, value in overrides.items():
        if isinstance(value, (list, tuple)):
            text = "-".join(format_flag_value(v) for v in value) or "none"
        else:
            text = format_flag_value(value)
        safe_path, safe_text = _SAFE.sub("_", str(path)), _SAFE.sub("_", text)
        changed |= (safe_path, safe_text) != (path, text)
        pieces.append(f"{safe_path}={safe_text}")
    safe = ",".join(pieces)
    if changed or len(safe) > _MAX_SLUG:
        digest = hashlib.sha1(json.dumps(overrides, default=repr).encode()).hexdigest()[:8]
        safe = f"{safe[:_MAX_SLUG]}-{digest}"
    return safe


def expand(path: str, arg: str | None) -> list[Run]:
    """Every SWEEP entry of the experiment file as a Run, each built and validated first.

    Entries with the same overrides (e.g. listed in two groups) are one run. UserError names
    the first entry that does not build."""
    module = load_experiment(path)
    try:
        get_config(module, arg)  # a bad --arg is not any one entry's fault
    except UserError as e:
        raise UserError(f"--config={path}:{arg}: {e}") from None
    runs: list[Run] = []
    seen: dict[str, Run] = {}
    for i, entry in enumerate(entries(module, path)):
        group = entry.get(GROUP_KEY, "")
        overrides = overrides_of(entry)
        try:
            if not isinstance(group, str):
                raise UserError(f"'{GROUP_KEY}' must be a string, got {group!r}")
            config = build_config(module, arg, overrides)
        except UserError as e:
            raise UserError(f"{path} SWEEP entry {i} {entry!r}: {e}") from None
        run = Run(i, group, overrides, slug(overrides), run_identity.results_identity(config))
        key = json.dumps(sorted(overrides.items()), default=repr)
        if key in seen:
            continue
        if any(r.slug == run.slug for r in runs):  # only a hash collision could do this
            raise UserError(f"{path} SWEEP entry {i}: workdir name {run.slug} is taken")
        seen[key] = run
        runs.append(run)
    return runs


def finished(workdir: str, run: Run) -> tuple[bool, str]:
    """Whether `workdir` holds the results of exactly this run, and if not, why (for the log):
    results.json must exist, be readable, and record the run's results identity. Results of
    runs older than that record are matched through the workdir's config.json."""
    if not os.path.exists(os.path.join(workdir, "results.json")):
        return False, "no results.json"
    # a torn one (a kill mid-write before writes were atomic) means: rerun, it resumes
    results = workdir_io.read_json_if_valid(workdir, "results.json")
    if not isinstance(results, dict):
        return False, "results.json is unreadable"
    recorded = results.get("results_identity")
    if recorded is None:
        config = workdir_io.read_json_if_valid(workdir, "config.json")
        if not isinstance(config, dict):
            return False, "results.json records no config identity and config.json is unreadable"
        recorded = run_identity.results_identity(config)
    if recorded != run.results_identity:
        return False, "results.json is of another config of this entry"
    return True, "results.json exists"


def pack_groups(runs: list[Run], configs_: dict[str, ml_collections.ConfigDict],
                max_size: int) -> list[list[Run]]:
    """The runs in SWEEP order, compatible ones of the same length together (train_packed.pack_key
    and `train.num_steps`), at most `max_size` a group; a run that trains the base's weights is
    a group of its own."""
    from prefix_jax import train_packed  # (imports jax: only where packing is decided)

    groups: list[list[Run]] = []
    open_groups: dict[str, list[Run]] = {}
    for run in runs:
        config = configs_[run.slug]
        if train_packed.trains_base(config):
            groups.append([run])
            continue
        # Same length too: a finished run in a vmapped step still costs a run's compute.
        key = f"{train_packed.pack_key(config)} num_steps={config.train.num_steps}"
        group = open_groups.get(key)
        if group is None or len(group) >= max_size:
            group = open_groups[key] = []
            groups.append(group)
        group.append(run)
    return groups


def experiment_name(path: str, arg: str | None) -> str:
    """`e2e_smollm2`, or `e2e_smollm2-runlocal` with an arg: runs of different args (a smoke
    sweep and the real one) never share, and so never skip, each other's workdirs."""
    name = os.path.splitext(os.path.basename(path))[0]
    return f"{name}-{_SAFE.sub('_', arg)}" if arg else name


# ---- The tool -------------------------------------------------------------------------------

def main() -> None:
    if not _CONFIG.value:
        cli.fail("--config is required: the experiment file, e.g. "
                 "--config=experiments/e2e_smollm2.py[:runlocal]")
    path, arg = cli.split_config(_CONFIG.value)
    if _TPU.value is None and not _ROOT.value:
        cli.fail("--root is required: the directory that holds the sweep's workdirs")
    if _TPU.value is not None:
        if not _ZONE.value:
            cli.fail("--tpu needs --zone (the pod's zone, e.g. us-central2-b)")
        if not (_BUCKET.value or "").startswith("gs://"):
            cli.fail("--tpu needs --bucket=gs://BUCKET/DIR: the pod's runs write there")
    try:
        pattern = re.compile(_FILTER.value) if _FILTER.value is not None else None
    except re.error as e:
        cli.fail(f"--filter={_FILTER.value!r} is not a regular expression: {e}")

    runs = expand(path, arg)  # every entry validated before anything runs
    if _PACK_MAX.value < 1:
        cli.fail(f"--pack_max={_PACK_MAX.value}: give at least 1")
    if _RUN_PACKED.value is not None:
        run_packed_group(runs, path, arg, _RUN_PACKED.value)
        return
    if pattern is not None:
        runs = [r for r in runs if pattern.search(r.group) or pattern.search(r.slug)]
        if not runs:
            cli.fail(f"--filter={_FILTER.value!r} matches no SWEEP entry (group names and "
                     "slugs; --dry_run without --filter lists them)")
    experiment = experiment_name(path, arg)
    if _TPU.value is not None:
        print_pod_launches(runs, path, arg, experiment)
    else:
        run_locally(runs, os.path.join(_ROOT.value, experiment))


def print_pod_launches(runs: list[Run], path: str, arg: str | None, experiment: str) -> None:
    """One launch_tpu_pod.sh line per run (run them one at a time: each uses the whole pod)."""
    config = os.path.relpath(os.path.abspath(path), _REPO_ROOT)
    if config.startswith(".."):
        cli.fail(f"{path} is outside this checkout; the pod gets only the checkout "
                 "(git archive of HEAD), so put the experiment file in experiments/")
    launcher = os.path.relpath(os.path.join(_REPO_ROOT, "scripts", "launch_tpu_pod.sh"))
    where = ["--tpu", _TPU.value, "--zone", _ZONE.value]
    if _PROJECT.value:
        where += ["--project", _PROJECT.value]
    bucket = f"{_BUCKET.value.rstrip('/')}/{experiment}"
    config_arg = config + (f":{arg}" if arg is not None else "")
    for run in runs:
        print(shlex.join([launcher, *where, "--bucket", bucket, "--config", config_arg,
                          "--run", run.slug, "--", *run.flags()]))
    print(f"# {len(runs)} runs: launch one at a time (each uses every worker of {_TPU.value}); "
          f"workdirs {bucket}/SLUG")


_FORWARDED = (signal.SIGINT, signal.SIGTERM)


def run_child(command: list[str], env: dict[str, str]) -> tuple[int, int | None]:
    """Run `command`; a SIGINT or SIGTERM sent to this process meanwhile is passed on to it
    (a training run then saves a checkpoint at its next step and exits) and waited for.
    Returns its exit status and the first signal forwarded (None if none)."""
    received: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum, frame):
        received.append(signum)
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    try:
        child = subprocess.Popen(command, env=env)
        if received:  # arrived while the child was being started
            child.send_signal(received[0])
        status = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return status, (received[0] if received else None)


def run_packed_group(runs: list[Run], path: str, arg: str | None, indices: list[str]) -> None:
    """`--run_packed`: the given SWEEP entries trained as one packed program (train_packed)."""
    from prefix_jax import train_packed  # (imports jax)
    from prefix_jax.training.preemption import Stopped

    if not _ROOT.value:
        cli.fail("--run_packed needs --root")
    by_index = {str(r.index): r for r in runs}
    unknown = [i for i in indices if i not in by_index]
    if unknown:
        cli.fail(f"--run_packed names entry {unknown[0]!r}, which is no SWEEP entry's position "
                 f"(0..{max(r.index for r in runs)}, duplicates excluded)")
    module = load_experiment(path)
    root = os.path.join(_ROOT.value, experiment_name(path, arg))
    group = [by_index[i] for i in indices]
    try:
        train_packed.train_packed([build_config(module, arg, r.overrides) for r in group],
                                  [os.path.join(root, r.slug) for r in group])
    except Stopped as e:
        print(f"stopped by {signal.Signals(e.signum).name}; rerun to resume", file=sys.stderr)
        sys.exit(128 + e.signum)


def run_locally(runs: list[Run], root: str) -> None:
    # Each run imports this checkout's code, wherever the sweep was started from.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [_REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    done = skipped = 0
    failed: list[str] = []
    signum, stopped = None, None
    todo = []
    for run in runs:
        done_before, why = finished(os.path.join(root, run.slug), run)
        if done_before:
            if not _DRY_RUN.value:
                print(f"{run.slug}: skipped ({why})", flush=True)
            else:
                print("# done, would skip: " + run.slug)
            skipped += 1
        else:
            todo.append((run, why))
    if _PACK.value and todo:
        path, arg = cli.split_config(_CONFIG.value)
        module = load_experiment(path)
        built = {run.slug: build_config(module, arg, run.overrides) for run, _ in todo}
        groups = pack_groups([run for run, _ in todo], built, _PACK_MAX.value)
    else:
        groups = [[run] for run, _ in todo]
    why_of = {run.slug: why for run, why in todo}
    for n, group in enumerate(groups, 1):
        if len(group) == 1:
            workdir = os.path.join(root, group[0].slug)
            command = [sys.executable, "-m", "prefix_jax.main", f"--config={_CONFIG.value}",
                       f"--workdir={workdir}", *group[0].flags()]
        else:
            command = [sys.executable, "-m", "prefix_jax.sweep", f"--config={_CONFIG.value}",
                       f"--root={_ROOT.value}",
                       f"--run_packed={','.join(str(r.index) for r in group)}"]
        if _DRY_RUN.value:
            print(shlex.join(command))
            continue
        names = group[0].slug if len(group) == 1 else f"{len(group)} runs packed"
        label = f"[{n}/{len(groups)}] {names}"
        for run in group:
            if os.path.exists(os.path.join(root, run.slug, "results.json")):
                print(f"{label}: {run.slug} not done: {why_of[run.slug]}; running it",
                      flush=True)
        print(f"{label}: {shlex.join(command)}", flush=True)
        started = time.perf_counter()
        status, signum = run_child(command, env)
        slugs = [r.slug for r in group]
        if signum is not None:
            stopped = " ".join(slugs)
            print(f"{label}: stopped by {signal.Signals(signum).name} (exit status {status}); "
                  "rerun the same command to resume the sweep from that run's checkpoint",
                  flush=True)
            break
        if status == 0:
            done += len(group)
            print(f"{label}: done in {time.perf_counter() - started:.0f} s", flush=True)
        else:
            failed += slugs
            print(f"{label}: FAILED (exit status {status})", flush=True)
            if _STOP_ON_ERROR.value:
                break
    if _DRY_RUN.value:
        print(f"# dry run: {len(runs)} runs, {skipped} already done (would be skipped), "
              f"under {root}")
        return
    left = len(runs) - done - skipped - len(failed) - (len(stopped.split()) if stopped else 0)
    why = "--stop_on_error" if signum is None else signal.Signals(signum).name
    print(f"sweep {os.path.basename(root)}: {done} done, {skipped} skipped, {len(failed)} "
          f"failed" + (f", {len(stopped.split())} stopped ({stopped})" if stopped else "")
          + (f", {left} not started ({why})" if left else "")
          + f" of {len(runs)} under {root}" + (f"; failed: {' '.join(failed)}" if failed else ""))
    if signum is not None:
        sys.exit(128 + signum)
    if failed:
        sys.exit(1)


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
