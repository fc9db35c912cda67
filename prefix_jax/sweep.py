"""An experiment file's `SWEEP` as runs: each entry's overrides applied and validated, its
workdir name (a readable slug of the overrides) and its `prefix_jax.main` command line.

The SWEEP contract is documented in experiments/sweeps.py and experiments/README.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import sys
from types import ModuleType
from typing import Any

import ml_collections

from prefix_jax import configs
from prefix_jax.errors import UserError

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

    def flags(self) -> list[str]:
        """The overrides as `prefix_jax.main` flags."""
        return [f"--config.{path}={format_flag_value(v)}" for path, v in self.overrides.items()]


def load_experiment(path: str) -> ModuleType:
    """Import an experiment file (`experiments/NAME.py`) by its path."""
    if not os.path.isfile(path) or not path.endswith(".py"):
        raise UserError(f"{path}: not an experiment file; give a path like "
                        "experiments/e2e_smollm2.py")
    if _REPO_ROOT not in sys.path:  # experiment files import `experiments.sweeps`
        sys.path.insert(0, _REPO_ROOT)
    name = "_sweep_experiment_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
        raise UserError(f"{path} with --arg {arg!r}: {e}") from None
    runs: list[Run] = []
    seen: dict[str, Run] = {}
    for i, entry in enumerate(entries(module, path)):
        group = entry.get(GROUP_KEY, "")
        overrides = overrides_of(entry)
        try:
            if not isinstance(group, str):
                raise UserError(f"'{GROUP_KEY}' must be a string, got {group!r}")
            build_config(module, arg, overrides)
        except UserError as e:
            raise UserError(f"{path} SWEEP entry {i} {entry!r}: {e}") from None
        run = Run(i, group, overrides, slug(overrides))
        key = json.dumps(sorted(overrides.items()), default=repr)
        if key in seen:
            continue
        if any(r.slug == run.slug for r in runs):  # only a hash collision could do this
            raise UserError(f"{path} SWEEP entry {i}: workdir name {run.slug} is taken")
        seen[key] = run
        runs.append(run)
    return runs


def experiment_name(path: str, arg: str | None) -> str:
    """`e2e_smollm2`, or `e2e_smollm2-runlocal` with an arg: runs of different args (a smoke
    sweep and the real one) never share, and so never skip, each other's workdirs."""
    name = os.path.splitext(os.path.basename(path))[0]
    return f"{name}-{_SAFE.sub('_', arg)}" if arg else name
