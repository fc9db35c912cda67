"""What makes two starts of one workdir the same experiment, and the run log of every start.

A run's *identity* is its flattened config (`"optim.lr": 0.02`, ...) minus `RESUMABLE`: the
fields that may change when a run is resumed because they change neither the trained prefix
nor what a checkpoint holds. Every checkpoint records the identity of the run that wrote it
(its `meta` item); a resume whose identity differs is refused before anything is written,
unless each differing field is named in `allow_changes` (`--allow_changes` of prefix_jax.main).

`results_identity` is the digest of what the final results depend on (the identity plus the
number of steps and the evaluation settings): results.json records it, and sweep.py counts a
run as done only when it equals the digest of the SWEEP entry's config.

This module imports no JAX, so the sweep tool can use it without starting JAX.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import socket
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
from etils import epath

from prefix_jax.errors import UserError
from prefix_jax.training import workdir as workdir_io

# Fields that never change what is computed, only when it is logged or saved and how the work
# is laid out on devices. A mesh (or process count) change is legal: orbax restores a
# checkpoint into any mesh (each process reads its shards), and the global batch is the same
# whatever the layout; sums may be reduced in another order, so floats can differ in the last
# bits. model.remat recomputes the same values (memory against time).
LAYOUT_FIELDS = (
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "mesh", "distributed", "model.remat",
)
# Fields that may change on resume (a name covers the field or the whole section it names):
# the layout, more steps (the learning-rate schedule is then stretched to the new end from the
# restored step on), and every evaluation setting (the prefix is the same; only what is
# measured about it changes).
RESUMABLE = (*LAYOUT_FIELDS, "train.num_steps", "eval", "evals")

# Config fields added after runs may already exist, each with the value that computes exactly
# what the code did before the field existed. At that value a field is left out of `identity`
# and `results_identity`, so adding a field does not turn every existing checkpoint into
# "another experiment" (a refused resume) or every finished sweep run into "not done" (a rerun);
# any other value is part of both, as every field is. Register a field here when you add it.
ADDED_FIELDS: dict[str, Any] = {}

_ABSENT = "(absent)"
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")


def flatten(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """`{"optim": {"lr": 0.1}}` -> `{"optim.lr": 0.1}`, every value as JSON reads it back
    (tuples become lists), so a flattened config compares equal to one read from JSON."""
    tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    flat: dict[str, Any] = {}

    def visit(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                visit(value, path + ".")
            else:
                flat[path] = json.loads(json.dumps(value, default=str))

    visit(tree, "")
    return flat


def _covered(path: str, names: Iterable[str]) -> bool:
    return any(path == n or path.startswith(n + ".") for n in names)


def _defining(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config without ADDED_FIELDS at the value older runs imply."""
    return {k: v for k, v in flatten(config).items()
            if not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}


def identity(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `config` that define the experiment (every field not in RESUMABLE)."""
    return {k: v for k, v in _defining(config).items() if not _covered(k, RESUMABLE)}


def digest(fields: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over the fields as canonical JSON."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def results_identity(config: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
    """The digest of everything the final results depend on (all but LAYOUT_FIELDS)."""
    return digest({k: v for k, v in _defining(config).items()
                   if not _covered(k, LAYOUT_FIELDS)})


def check_allowed_names(allow_changes: Sequence[str], config: ml_collections.ConfigDict
                        ) -> None:
    """Every name in `allow_changes` is a field or section of `config` (a typo is an error,
    not a silently broader or narrower override)."""
    fields = flatten(config)
    for name in allow_changes:
        if not any(path == name or path.startswith(name + ".") for path in fields):
            raise UserError(f"--allow_changes names '{name}', which is no config field or "
                            "section; write dotted names like optim.lr or data")


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`field: saved -> current` for every field whose value differs or exists on one side."""
    lines = []
    for path in sorted(set(saved) | set(current)):
        before, after = saved.get(path, _ABSENT), current.get(path, _ABSENT)
        if before != after:
            lines.append(f"{path}: {before!r} -> {after!r}")
    return lines


def check(saved: Mapping[str, Any] | None, current: Mapping[str, Any],
          allow_changes: Sequence[str], where: str) -> list[str]:
    """The differences between the identity `saved` with a checkpoint (at `where`) and this
    run's that `allow_changes` accepts; a UserError listing every other one. A `saved` of None
    (a checkpoint older than identities, and no config.json beside it) accepts anything."""
    if saved is None:
        return []
    changed = differences(saved, current)
    refused = [line for line in changed if not _covered(line.split(":")[0], allow_changes)]
    if refused:
        fields = ",".join(line.split(":")[0] for line in refused)
        raise UserError(
            f"{where} was saved by another experiment ({len(refused)} field(s) differ, "
            f"checkpoint -> this run: {'; '.join(refused)}); use a new --workdir, or resume "
            f"with these changes on purpose: --allow_changes={fields}")
    return changed


def legacy_identity(workdir: str) -> dict[str, Any] | None:
    """For checkpoints written before identities were recorded: the identity of the
    workdir's config.json (the last start's config), or None without one."""
    if not (epath.Path(workdir) / "config.json").exists():
        return None
    return identity(workdir_io.read_json(
        workdir, "config.json", fix="the checkpoints record no identity to check this run "
        "against; restore that file or use a new --workdir"))


def versions() -> dict[str, str]:
    """prefix_jax and the libraries a checkpoint's format depends on, by installed version."""
    found = {}
    for name in ("prefix_jax", *LIBRARIES):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_commit() -> str | None:
    """The checkout's commit (with `+dirty` for uncommitted changes), None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_record(config: ml_collections.ConfigDict, argv: Sequence[str], devices: Mapping,
               resumed_from: int | None, accepted_changes: Sequence[str]) -> dict[str, Any]:
    """One start of a run, as the run log records it."""
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv),
        "host": socket.gethostname(),
        "devices": dict(devices),
        "resumed_from": resumed_from,
        "accepted_changes": list(accepted_changes),
        "git_commit": git_commit(),
        "versions": versions(),
        "config": json.loads(config.to_json_best_effort()),
    }


RUN_LOG = "run_log.jsonl"


def append_run_log(workdir: str, record: Mapping[str, Any]) -> None:
    """Add one line to the workdir's run log. The whole file is rewritten through the workdir
    module (so the write is atomic where it is, and works where appending does not: gs://)."""
    path = epath.Path(workdir) / RUN_LOG
    before = path.read_text(encoding="utf-8") if path.exists() else ""
    if before and not before.endswith("\n"):
        before += "\n"  # a torn last line stays as it was, on a line of its own
    workdir_io.write_text(workdir, RUN_LOG, before + json.dumps(record) + "\n")
