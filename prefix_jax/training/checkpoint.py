"""Checkpoints: an orbax CheckpointManager under `workdir/checkpoints`.

Each step holds three items: `state` (step, trainable params, optimizer state: never the frozen
base), `data` (the grain iterator's state, JSON) and `meta` (JSON: a fingerprint of the frozen
base and the trainable shapes, checked on restore so a checkpoint never silently meets another
model). Orbax writes sharded arrays from every process; the iterator state is the same in every
process (each takes its rows of the same global batch), so a checkpoint written by N processes
restores in M.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from prefix_jax.errors import UserError
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
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=ocp.args.JsonSave(data_iter.get_state()),
                                           meta=ocp.args.JsonSave(meta)))


def restore_latest(mgr: ocp.CheckpointManager, state, data_iter, meta: dict):
    """The newest readable checkpoint restored into `state`'s structure and `data_iter`, or None.

    An unreadable (corrupt or partial) checkpoint is moved to `workdir/corrupt_checkpoints/` with
    a warning naming it, and the next older one is tried. A checkpoint of another base model or
    prefix shape is a UserError: the run stops before anything is written.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    for step in sorted(mgr.all_steps(), reverse=True):
        where = os.path.join(str(mgr.directory), str(step))
        try:
            saved = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # any read failure means: not usable
            _quarantine(mgr, step, e)
            continue
        check_compatible(saved, meta, where)
        try:
            restored = mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
            data_iter.set_state(restored.data)
        except Exception as e:
            _quarantine(mgr, step, e)
            continue
        if int(restored.state.step) != step:
            _quarantine(mgr, step, ValueError(f"it holds step {int(restored.state.step)}"))
            continue
        return restored.state
    if mgr.all_steps():
        raise UserError(f"no checkpoint in {mgr.directory} could be read; move that directory "
                        "away to start over")
    return None


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


def _quarantine(mgr: ocp.CheckpointManager, step: int, error: Exception) -> None:
    """Move an unreadable step aside (kept for inspection, out of orbax's way) and warn."""
    source = os.path.join(str(mgr.directory), str(step))
    target_dir = os.path.join(os.path.dirname(str(mgr.directory)), "corrupt_checkpoints")
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
        shutil.move(source, target)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    message = (f"warning: checkpoint {source} is unreadable ({type(error).__name__}: "
               f"{first_line}); moved to {target}, trying the previous one")
    logging.warning(message)
    print(message, file=sys.stderr)
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
