"""A bank of trained prefixes: several workdirs of one base model, stacked so that each row of a
batch can use its own prefix (`decoding.generate(..., prefix_rows=...)`).

`load(workdirs)` reads each workdir's `config.json` and newest checkpoint, loads the frozen base
once, checks that every checkpoint was trained on that base, and returns the prefixes as one
`KV([L, N, P, K, D])`, row i from `workdirs[i]` (a multi-task run of T tasks contributes T
consecutive rows, one per task).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prefix_jax import configs, models, prefix
from prefix_jax.errors import UserError
from prefix_jax.models.core import KV
from prefix_jax.training import checkpoint
from prefix_jax.training import workdir as workdir_io


@dataclasses.dataclass(frozen=True)
class Bank:
    base: models.LoadedModel  # the frozen base (with any trained base weights of a single run)
    prefixes: KV  # [L, N, P, K, D], row i from workdirs[i]
    options: prefix.DecodeOptions  # positions, prefix layers, infix: the same for every run
    configs: tuple[ml_collections.ConfigDict, ...]  # each run's config
    steps: tuple[int, ...]  # the checkpoint step each prefix comes from

    def row(self, i: int) -> KV:
        """Run i's prefix alone, `KV([L, 1, P, K, D])`."""
        return KV(self.prefixes.k[:, i:i + 1], self.prefixes.v[:, i:i + 1])


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"--workdir={workdir} has no config.json; point it at a directory "
                        "written by `python -m prefix_jax.main`")
    config = ml_collections.ConfigDict(
        workdir_io.read_json(workdir, "config.json", fix="restore it or retrain"))
    # Only the fields serving needs: configs of older runs lack newer fields (eval.num_beams...).
    needed = ("seed", "model.path", "model.dtype", "prefix.mode", "prefix.length",
              "prefix.positions", "prefix.init", "prefix.init_std", "data.task", "data.dir")
    for field in needed:
        node = config
        for part in field.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise UserError(f"{path} has no field {field}; is it a prefix_jax run's "
                                "config.json?")
            node = node[part]
    # Model fields added after a run was trained (e.g. remat, param_dtype) take their defaults.
    model = configs.model_config(config.model.path)
    model.update(config.model.to_dict())
    config.model = model
    prefix_cfg = configs.prefix_config()  # prefix fields added later (layers, reparam, ...)
    prefix_cfg.update(config.prefix.to_dict())
    config.prefix = prefix_cfg
    return config


def _trained_base_leaves(trainable: dict) -> dict:
    """The trained base weights in a checkpoint's trainable tree (empty for prefix-only runs)."""
    flat = jax.tree_util.tree_flatten_with_path(trainable.get("base", {}))[0]
    return {path: leaf for path, leaf in flat if leaf is not None}


def load(workdirs: list[str]) -> Bank:
    """The newest checkpoint of each workdir as one bank (see the module docstring)."""
    if not workdirs:
        raise UserError("give at least one --workdir")
    run_configs = [read_config(w) for w in workdirs]
    first = run_configs[0]
    for w, c in zip(workdirs[1:], run_configs[1:]):
        for field in ("model", "prefix"):
            if field == "prefix":
                fields = ("length", "positions", "mode", "layers", "placement")
                same = ([c.prefix[f] for f in fields], len(configs.task_dirs(c))) == \
                    ([first.prefix[f] for f in fields], len(configs.task_dirs(first)))
            else:
                same = c.model.to_dict() == first.model.to_dict()
            if not same:
                raise UserError(f"--workdir={w} has {field} {c[field].to_dict()} but "
                                f"--workdir={workdirs[0]} has {first[field].to_dict()}; a bank "
                                "needs runs of one base model with equal prefix length, mode, "
                                "layers, placement, positions and number of tasks")
    base = models.load(first.model, seed=first.seed)
    fingerprint = checkpoint.base_fingerprint(base.params)
    prefix_params, steps = [], []
    trained_base = {}
    for w in workdirs:
        step, state, meta = checkpoint.load_latest_arrays(w)
        checkpoint.check_compatible(meta, {"base_fingerprint": fingerprint,
                                           "model_source": base.source,
                                           "trainable_shapes": meta.get("trainable_shapes")},
                                    os.path.join(w, "checkpoints", str(step)))
        trained_base = _trained_base_leaves(state["trainable"])
        if trained_base and len(workdirs) > 1:
            raise UserError(f"--workdir={w} trained base weights (trainable="
                            f"{run_configs[workdirs.index(w)].trainable!r}); a bank of several "
                            "runs shares one frozen base: give that run alone")
        prefix_params.append(state["trainable"]["prefix"])
        steps.append(step)
    if trained_base:
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.asarray(trained_base.get(path, x)), base.params)
        base = dataclasses.replace(base, params=params)
    # Each run's own module: runs may differ in reparameterization (an MLP or flat prefix).
    kvs = [prefix.compute(prefix.build(c.prefix, base.config, len(configs.task_dirs(c))), p,
                          base.module, base.params) for c, p in zip(run_configs, prefix_params)]
    return Bank(base, KV(jnp.concatenate([kv.k for kv in kvs], axis=1),
                         jnp.concatenate([kv.v for kv in kvs], axis=1)),
                prefix.decode_options(first.prefix, base.config), tuple(run_configs),
                tuple(steps))


@dataclasses.dataclass(frozen=True)
class Run:
    """One run's newest checkpoint with the modules that read it (for eject, layer_influence)."""

    config: ml_collections.ConfigDict
    base: models.LoadedModel  # with the run's trained base weights, if any
    prefix_module: prefix.Prefix
    prefix_params: dict
    step: int
    meta: dict  # the checkpoint's meta (base fingerprint, trainable shapes)


def load_run(workdir: str) -> Run:
    config = read_config(workdir)
    base = models.load(config.model, seed=config.seed)
    step, state, meta = checkpoint.load_latest_arrays(workdir)
    checkpoint.check_compatible(meta, {"base_fingerprint": checkpoint.base_fingerprint(
        base.params), "model_source": base.source, "trainable_shapes": meta.get(
        "trainable_shapes")}, os.path.join(workdir, "checkpoints", str(step)))
    trained_base = _trained_base_leaves(state["trainable"])
    if trained_base:
        base = dataclasses.replace(base, params=jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.asarray(trained_base.get(path, x)), base.params))
    module = prefix.build(config.prefix, base.config, len(configs.task_dirs(config)))
    return Run(config, base, module, state["trainable"]["prefix"], step, meta)


def assignments(n_runs: int, rows: list[int]) -> np.ndarray:
    """Check per-prompt bank rows (0-based) against the bank size."""
    rows_array = np.asarray(rows, np.int32)
    if rows_array.size and (rows_array.min() < 0 or rows_array.max() >= n_runs):
        bad = int(rows_array[(rows_array < 0) | (rows_array >= n_runs)][0])
        raise UserError(f"prefix row {bad} is out of range: the bank holds {n_runs} runs "
                        f"(rows 0..{n_runs - 1}, one per --workdir in order)")
    return rows_array
