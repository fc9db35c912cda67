"""Device mesh, logical axis rules and shardings: one code path from one CPU to a TPU pod.

The mesh has three named axes, `data`, `fsdp` and `tensor` (sizes from `config.mesh`, -1 = all
remaining devices). Every parameter dimension has a logical name (`embed`, `heads`, `mlp`, ...,
given per parameter path by the model's own `config.logical_axes`); `config.mesh.rules`
maps logical names to mesh axes, MaxText style. With the default rules
(`configs.DEFAULT_MESH_RULES`) the frozen base is FSDP-sharded over `fsdp` and tensor-parallel
over `tensor`, the prefix is replicated, and batches are split over `data` x `fsdp`. Optimizer
state follows its parameters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from prefix_jax.errors import UserError
from prefix_jax.models.core import BATCH_MESH_AXES
from prefix_jax.training.partition import path_str

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = BATCH_MESH_AXES  # FSDP shards the batch too: each fsdp shard sees its own rows

AxesFn = Callable[[str, int], Sequence[str | None]]  # (param path, ndim) -> logical names


def make_mesh(mesh_cfg: ml_collections.ConfigDict) -> Mesh:
    """The `data` x `fsdp` x `tensor` mesh over every device of every process."""
    sizes = [mesh_cfg[name] for name in MESH_AXES]
    n = jax.device_count()
    if any(not isinstance(s, int) or s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise UserError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: each must be a positive "
                        "integer, or -1 (at most one) for the remaining devices")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise UserError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {n} "
                            "devices; make the fixed sizes' product divide the device count")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                        f"{n} are present; set --config.mesh.* so their product is {n}, or -1")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
    """PartitionSpec for one array from its dimensions' logical names.

    A dimension whose size the mesh axes do not divide stays replicated (e.g. 3 KV heads over
    tensor=2): always correct, only less sharded. A mesh axis is used once per array.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def tree_shardings(tree, axes_fn: AxesFn, mesh: Mesh, rules) -> Any:
    """NamedSharding for every array leaf of a parameter tree (paths as in `partition`)."""
    def one(path, leaf):
        names = axes_fn(path_str(path), len(leaf.shape))
        return NamedSharding(mesh, logical_spec(names, leaf.shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(state, param_shardings, mesh: Mesh) -> Any:
    """Shardings of a TrainState-like pytree (abstract or concrete) whose optimizer state holds
    copies of the trainable tree.

    An optimizer leaf whose path ends with a parameter's path and has its shape (Adam's moments:
    `.../mu/prefix/key`) takes that parameter's sharding; counters and the like are replicated.
    """
    by_path = {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]}
    shapes = {path_str(p): x.shape for p, x in
              jax.tree_util.tree_flatten_with_path(state.trainable)[0]}

    def one(path, leaf):
        parts = path_str(path).split("/")
        for i in range(len(parts)):
            tail = "/".join(parts[i:])
            if tail in by_path and shapes[tail] == leaf.shape:
                return by_path[tail]
        return replicated(mesh)

    return state.replace(step=replicated(mesh), trainable=param_shardings,
                         opt_state=jax.tree_util.tree_map_with_path(one, state.opt_state))


def place(tree, shardings, consume: bool = False) -> Any:
    """Arrays -> global arrays with `shardings`, each device receiving only its own shard.

    Host arrays (and arrays this process holds whole) are cut on the host, so no device ever
    holds a full copy of a sharded parameter; every process holds the same values (each loads
    the model file) and contributes its addressable shards. Global arrays are resharded.
    `consume=True` (for a tree of nested dicts that the caller gives up): each leaf of `tree` is
    replaced by its placed array as soon as that exists, so the host copy is freed leaf by leaf
    and a model never sits in memory twice (on CPU the "device" is host memory too).
    """
    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    if not consume:
        return jax.tree.map(one, tree, shardings)

    def walk(node: dict, node_shardings: dict) -> None:
        for key in list(node):
            if isinstance(node[key], dict):
                walk(node[key], node_shardings[key])
            else:
                node[key] = one(node[key], node_shardings[key])

    walk(tree, shardings)
    return tree


def under_mesh(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` called with `mesh` set (`jax.set_mesh`), so a jitted step traced by it sees the mesh
    and the models keep activation rows split over the batch axes (`models.core.shard_rows`)."""
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return call


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over `data` x `fsdp`."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of the batch."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def bytes_per_device(tree) -> dict[str, int]:
    """Bytes of `tree`'s arrays held by each of this process's devices (for logs and tests)."""
    held: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            key = str(shard.device)
            held[key] = held.get(key, 0) + shard.data.nbytes
    return held


def parse_rules(rules) -> tuple[tuple[str, Any], ...]:
    """`config.mesh.rules` as (logical name, mesh axis | tuple | None) pairs, validated."""
    out = []
    for item in rules:
        if len(item) != 2 or not isinstance(item[0], str):
            raise UserError(f"mesh.rules entry {item!r}: must be (logical_name, mesh_axis)")
        axes = item[1]
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        bad = [a for a in names if a not in MESH_AXES]
        if bad:
            raise UserError(f"mesh.rules entry {item!r} names mesh axis {bad[0]!r}; the axes "
                            f"are {MESH_AXES}")
        out.append((item[0], axes if isinstance(axes, str) or axes is None else tuple(axes)))
    return tuple(out)


def regex_axes(table: Sequence[tuple[str, Sequence[str | None]]]) -> AxesFn:
    """An AxesFn from (path regex, logical names) pairs; unmatched paths are replicated."""
    compiled = [(re.compile(pattern), names) for pattern, names in table]

    def axes_fn(path: str, ndim: int) -> Sequence[str | None]:
        for pattern, names in compiled:
            if pattern.search(path):
                if len(names) != ndim:
                    raise ValueError(f"logical axes {names} for {path} do not match its "
                                     f"{ndim} dimensions")
                return names
        return (None,) * ndim

    return axes_fn


def layout(mesh, frozen, state) -> dict:
    """Where the arrays live (sharding.json: what a reader checks to see FSDP/TP took effect)."""
    base_held = bytes_per_device(frozen)
    state_held = bytes_per_device(state)
    return {"mesh": dict(mesh.shape), "devices": jax.device_count(),
            "processes": jax.process_count(),
            "base_bytes": sum(x.nbytes for x in jax.tree.leaves(frozen)),
            "base_bytes_per_device_max": max(base_held.values(), default=0),
            "state_bytes_per_device_max": max(state_held.values(), default=0),
            "specs": {path_str(p): str(x.sharding.spec)
                      for p, x in jax.tree_util.tree_flatten_with_path(
                          {"frozen": frozen, "state": state})[0]}}
