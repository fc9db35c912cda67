"""Checkpoints: an orbax CheckpointManager under `workdir/checkpoints`.

Each step holds three items: `state` (step, trainable params, optimizer state: never the frozen
base), `data` (the grain iterator's state) and `meta` (JSON: a fingerprint of the frozen base
and the trainable shapes, checked on restore so a checkpoint never silently meets another model).
"""

from __future__ import annotations

import hashlib
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from prefix_jax.errors import UserError
from prefix_jax.partition import path_str


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
                                           data=grain.checkpoint.CheckpointSave(data_iter),
                                           meta=ocp.args.JsonSave(meta)))


def restore_latest(mgr: ocp.CheckpointManager, state, data_iter, meta: dict):
    """The newest checkpoint restored into `state`'s structure and `data_iter`, or None.

    Raises UserError when the checkpoint belongs to another base model or prefix shape.
    """
    step = mgr.latest_step()
    if step is None:
        return None
    saved = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    where = os.path.join(str(mgr.directory), str(step))
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
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored.state


def load_state_arrays(workdir: str, step: int | None = None) -> dict:
    """The saved `state` item of a run (latest step by default) as nested dicts of arrays,
    without needing the config that made it (for inspection, export and tests)."""
    mgr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                item_names=("state", "data", "meta"))
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise UserError(f"{workdir} has no checkpoint; train first or pick the right --workdir")
    return mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
