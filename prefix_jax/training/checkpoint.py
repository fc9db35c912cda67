"""Checkpoints: an orbax CheckpointManager under `workdir/checkpoints`.

Each step holds three items: `state` (step, trainable params, optimizer state: never the frozen
base), `data` (the grain iterator's state, JSON) and `meta` (JSON: a fingerprint of the frozen
base, the trainable shapes, the run's identity (run_identity.py) and the library versions,
checked on restore so a checkpoint never silently meets another model or experiment). Orbax
writes sharded arrays from every process; the iterator state is the same in every process (each
takes its rows of the same global batch), so a checkpoint written by N processes restores in M.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from prefix_jax.errors import UserError
from prefix_jax.training import run_identity
from prefix_jax.training.partition import path_str


def base_fingerprint(params) -> str:
    """blake2b over every frozen leaf's path, shape, dtype and bytes (16 hex digits)."""
    h = hashlib.blake2b(digest_size=8)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.asarray(leaf)
        h.update(f"{path_str(path)}:{arr.shape}:{arr.dtype};".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def shapes(tree) -> dict[str, list[int]]:
    return {path_str(p): list(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options, item_names=("state", "data", "meta"))


def save(mgr: ocp.CheckpointManager, step: int, state, data_iter, meta: dict) -> None:
    # force: the loop alone decides when to save; orbax's own policy may otherwise skip a
    # step (and return False) while an earlier async save is still being written
    saved = mgr.save(step, force=True,
                     args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(data_iter.get_state()),
                                             meta=ocp.args.JsonSave(meta)))
    if not saved:  # never report a checkpoint that was not written
        raise OSError(f"orbax declined to save step {step} (latest step: {mgr.latest_step()})")


@dataclasses.dataclass(frozen=True)
class Restored:
    state: Any  # the TrainState, restored into the given state's structure and shardings
    step: int
    accepted_changes: list[str]  # identity differences --allow_changes accepted


def restore_latest(mgr: ocp.CheckpointManager, state, data_iter, meta: dict,
                   allow_changes: Sequence[str] = ()) -> Restored | None:
    """The newest intact checkpoint restored into `state`'s structure and `data_iter`, or None
    when the workdir has never held one.

    Corruption and incompatibility are told apart, and only corruption moves anything:
    - a checkpoint that fails the integrity check (`integrity_problem`: missing or partial
      files, unreadable metadata, no commit marker) is moved to `workdir/corrupt_checkpoints/`
      with a warning, and the next older one is tried;
    - one of another base model, prefix shape or experiment (`meta["identity"]`, see
      run_identity.py), or whose saved tree does not fit this run's state (another optimizer,
      shapes or dtypes), stops the run with a UserError naming the cause, moving nothing;
    - one that is intact and fits but that the libraries fail to read (e.g. written by
      another orbax version) stops the run too, naming the error and both versions.
    Checkpoints that existed but none intact is an error, never a start from step 0.
    Process 0 decides which step to restore (and quarantines); every process restores it.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    step, accepted = _agree_on_step(mgr, abstract, meta, allow_changes)
    if step is None:
        return None
    where = os.path.join(str(mgr.directory), str(step))
    try:
        restored = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        data_iter.set_state(restored.data)
    except Exception as e:  # intact and fitting, yet unreadable: say why
        raise UserError(
            f"checkpoint {where} is intact and fits this run but could not be read "
            f"({_first_line(e)}){_version_note(meta, _read_meta(where))}; nothing was moved: "
            "install the library versions that wrote it, or move that directory out of "
            "checkpoints/ to resume from the previous one") from e
    if int(restored.state.step) != step:
        raise UserError(f"checkpoint {where} holds step {int(restored.state.step)}, not "
                        f"{step}; it was renamed or copied wrongly: move it out of "
                        "checkpoints/ and rerun")
    return Restored(restored.state, step, accepted)


def _agree_on_step(mgr, abstract, meta: dict, allow_changes: Sequence[str]
                   ) -> tuple[int | None, list[str]]:
    """Process 0 picks the step to restore (quarantining what fails the integrity check) and
    tells every process, so all restore the same one or all stop."""
    step, accepted, refusal = None, [], None
    if jax.process_index() == 0:
        try:
            step, accepted = _choose_step(mgr, abstract, meta, allow_changes)
        except UserError as e:
            refusal = e
    code = _NONE if step is None else step
    if refusal is not None:
        code = _REFUSED
    if jax.process_count() > 1:
        code = int(multihost_utils.broadcast_one_to_all(np.int64(code)))
    if refusal is not None:
        raise refusal
    if code == _REFUSED:
        raise UserError("process 0 refused to restore this workdir's checkpoints (its error "
                        "line says why)")
    mgr.reload()  # sees what process 0 moved away
    return (None if code == _NONE else code), accepted


_NONE, _REFUSED = -1, -2


def _choose_step(mgr, abstract, meta: dict, allow_changes: Sequence[str]
                 ) -> tuple[int | None, list[str]]:
    quarantine_dir = os.path.join(os.path.dirname(str(mgr.directory)), QUARANTINE)
    steps = sorted(mgr.all_steps(), reverse=True)
    for step in steps:
        where = os.path.join(str(mgr.directory), str(step))
        problem = integrity_problem(where)
        saved_tree = None if problem else _saved_tree(where)
        if not problem and not saved_tree:
            problem = "state tree metadata unreadable: orbax finds no arrays in it"
        if problem:
            _quarantine(mgr, step, problem)
            continue
        saved = _read_meta(where)
        check_compatible(saved, meta, where)
        saved_identity = saved.get("identity")
        if saved_identity is None:  # written before identities were recorded
            saved_identity = run_identity.legacy_identity(os.path.dirname(str(mgr.directory)))
            if saved_identity is None:
                _warn(f"checkpoint {where} records no experiment identity and the workdir has "
                      "no config.json: this run's config is assumed to be the one that wrote "
                      "it")
        accepted = run_identity.check(saved_identity, meta["identity"], allow_changes,
                                      f"checkpoint {where}")
        check_structure(where, saved_tree, abstract)
        return step, accepted
    if steps or _listdir(quarantine_dir):
        raise UserError(
            f"no checkpoint in {mgr.directory} is intact (every one failed the integrity "
            f"check and is kept in {quarantine_dir}); to start over from step 0 on purpose, "
            f"move {quarantine_dir} away (or use a new --workdir)")
    return None, []


QUARANTINE = "corrupt_checkpoints"
COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, before the final rename
_JSON_ITEMS = ("meta", "data")  # orbax JsonSave items: ITEM/metadata


def integrity_problem(where: str) -> str | None:
    """What makes the checkpoint directory `where` incomplete or unreadable, or None.

    Checks the files orbax writes for this manager's three items: the commit marker, the
    step's metadata, each JSON item, and the `state` item's tree metadata. It reads no array
    bytes (orbax reads those on restore)."""
    def read_json(relative: str):
        path = os.path.join(where, relative)
        if not os.path.isfile(path):
            raise ValueError(f"{relative} is missing")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{relative} is unreadable ({_first_line(e)})") from e

    if not os.path.isfile(os.path.join(where, COMMIT_MARKER)):
        return f"no {COMMIT_MARKER}: the save never completed"
    try:
        read_json("_CHECKPOINT_METADATA")
        for item in _JSON_ITEMS:
            read_json(os.path.join(item, "metadata"))
        if not isinstance(read_json(os.path.join("meta", "metadata")), dict):
            return "meta/metadata is not a JSON object"
        read_json(os.path.join("state", "_METADATA"))
    except ValueError as e:
        return str(e)
    return None


def _read_meta(where: str) -> dict:
    try:
        with open(os.path.join(where, "meta", "metadata")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _saved_tree(where: str) -> dict:
    """The saved `state` item's leaves ("/"-joined path -> shape and dtype), as orbax reads
    them from its metadata; empty when orbax finds none (its manifest is damaged)."""
    try:
        with ocp.StandardCheckpointer() as reader:
            tree = reader.metadata(os.path.join(where, "state")).item_metadata
    except Exception as e:  # its files parsed as JSON, yet this orbax cannot read them
        raise UserError(f"checkpoint {where}: this orbax cannot read its tree metadata "
                        f"({_first_line(e)}); install the orbax-checkpoint version that wrote "
                        "it (the run log lists it), or use a new --workdir") from e
    if tree is None:
        return {}
    return {"/".join(k): v for k, v in ocp.tree.to_flat_dict(tree).items()}


def check_structure(where: str, saved: dict, abstract) -> None:
    """The saved `state` leaves (`_saved_tree`) against this run's: the same paths, shapes and
    dtypes."""
    wanted = {"/".join(k): v for k, v in ocp.tree.to_flat_dict(
        ocp.tree.serialize_tree(abstract, keep_empty_nodes=True)).items()}
    problems = [f"{k} only in the checkpoint" for k in sorted(set(saved) - set(wanted))]
    problems += [f"{k} only in this run" for k in sorted(set(wanted) - set(saved))]
    for k in sorted(set(saved) & set(wanted)):
        have, want = saved[k], wanted[k]
        if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != np.dtype(want.dtype):
            problems.append(f"{k} is {np.dtype(have.dtype)}{list(have.shape)} in the "
                            f"checkpoint, {np.dtype(want.dtype)}{list(want.shape)} in this run")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more"
                                           if len(problems) > 4 else "")
        raise UserError(f"checkpoint {where} does not fit this run's state ({shown}): the "
                        "optimizer or trainable settings differ from the run that wrote it; "
                        "use a new --workdir or the original settings")


def _version_note(meta: dict, saved: dict) -> str:
    then, now = saved.get("versions") or {}, meta.get("versions") or {}
    changed = [f"{k} {then[k]} -> {now.get(k)}" for k in sorted(then) if then[k] != now.get(k)]
    return f"; written with other library versions: {', '.join(changed)}" if changed else ""


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0][:200]


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def _warn(message: str) -> None:
    logging.warning(message)
    print(f"warning: {message}", file=sys.stderr)


def check_compatible(saved: dict, meta: dict, where: str) -> None:
    """A checkpoint's meta against this run's: same base model, same trainable shapes."""
    if saved.get("base_fingerprint") != meta["base_fingerprint"]:
        raise UserError(
            f"checkpoint {where} was trained on base model {saved.get('model_source')} "
            f"(fingerprint {saved.get('base_fingerprint')}) but this run loads "
            f"{meta['model_source']} (fingerprint {meta['base_fingerprint']}); use a new --workdir "
            "or the original model.path")
    if saved.get("trainable_shapes") != meta["trainable_shapes"]:
        raise UserError(
            f"checkpoint {where} holds trainable shapes {saved.get('trainable_shapes')} but this "
            f"config makes {meta['trainable_shapes']}; use a new --workdir or the original "
            "prefix/trainable settings")


def _quarantine(mgr: ocp.CheckpointManager, step: int, problem: str) -> None:
    """Move a step that failed the integrity check aside (kept for inspection, out of orbax's
    way) and warn. Runs on process 0 only (see `_agree_on_step`)."""
    source = os.path.join(str(mgr.directory), str(step))
    target_dir = os.path.join(os.path.dirname(str(mgr.directory)), QUARANTINE)
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, f"{step}-{int(time.time())}")
    shutil.move(source, target)
    _warn(f"checkpoint {source} is unreadable ({problem}); moved to {target}, trying the "
          "previous one")
    mgr.reload()


def load_state_arrays(workdir: str, step: int | None = None) -> dict:
    """The saved `state` item of a run (latest step by default) as nested dicts of arrays on
    this process's first device, whatever mesh and processes wrote it, without needing the
    config that made it (for inspection, export and tests)."""
    return load_latest_arrays(workdir, step)[1]


def load_latest_arrays(workdir: str, step: int | None = None) -> tuple[int, dict, dict]:
    """(step, `state` as nested dicts of arrays on this process's first device, `meta`) of a
    run's newest (or given) step; an unreadable one is a UserError."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise UserError(f"{workdir} has no checkpoints/ directory; train first or pick the "
                        "right --workdir")
    mgr = ocp.CheckpointManager(directory, item_names=("state", "data", "meta"))
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise UserError(f"{workdir} has no checkpoint; train first or pick the right --workdir")
    path = os.path.join(str(mgr.directory), str(step), "state")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        with ocp.StandardCheckpointer() as reader:
            saved = reader.metadata(path).item_metadata  # shapes and dtypes, as saved
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
            state = reader.restore(path, target)
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # any read failure means: not usable
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"checkpoint {directory}/{step} is unreadable ({first_line}); rerun "
                        "training in that workdir to resume from an earlier one") from e
    return step, state, meta
