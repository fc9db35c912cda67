"""Every experiment file's SWEEP, entry by entry, on the tiny model.

Experiment files are found by glob (`experiments/*.py` with a SWEEP), so files added later are
covered. Every entry builds and validates with the `runlocal` arg. Two train steps run for the
FIRST entry of each distinct program; entries that differ from an earlier one only in the data
subset and seed (`data.train_examples`, `data.subsample_seed`, `seed`: the low-data protocol's
40 runs) compile the same step and run the same code, so they are only built and validated.
Eval is off, every batch has one shape and a persistent compilation cache serves repeated
programs. Measured on the shared 2-core CPU, e2e_smollm2's 45 entries: all trained 125 s wall /
65 s CPU; as here (6 trained) 59 s wall / 31 s CPU, ~5 s of it per distinct prefix length."""

from __future__ import annotations

import glob
import json
import math
import os

import jax
import pytest

from prefix_jax import sweep, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Overrides that change which rows train and in what order, not the compiled program.
DATA_ONLY = {"data.train_examples", "data.subsample_seed", "seed"}
# Fields this test sets itself to keep each trained entry short (an entry may set them too).
SHORTENED = {"train.num_steps", "eval.num_examples", "eval.eval_untuned", "data.bucket_multiple"}


def experiment_files() -> list[str]:
    """experiments/*.py that define get_config (not the package's helpers) and a SWEEP."""
    found = []
    for path in sorted(glob.glob(os.path.join(REPO, "experiments", "*.py"))):
        with open(path, encoding="utf-8") as f:
            if "def get_config" not in f.read():
                continue
        if hasattr(sweep.load_experiment(path), "SWEEP"):
            found.append(path)
    return found


def sweep_entries() -> list:
    params = []
    for path in experiment_files():
        stem = os.path.splitext(os.path.basename(path))[0]
        programs = set()
        for i, entry in enumerate(sweep.entries(sweep.load_experiment(path), path)):
            overrides = sweep.overrides_of(entry)
            program = json.dumps(sorted((k, v) for k, v in overrides.items()
                                        if k not in DATA_ONLY), default=repr)
            trains = program not in programs
            programs.add(program)
            params.append(pytest.param(path, i, trains,
                                       id=f"{stem}[{i}]-{sweep.slug(overrides)}"))
    return params


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module: entries that compile the same train
    step load it instead of compiling again."""
    from jax._src import compilation_cache  # reset_cache: the cache is checked once per process

    old = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    compilation_cache.reset_cache()


def test_every_experiment_with_a_sweep_is_found():
    names = [os.path.basename(p) for p in experiment_files()]
    assert "e2e_smollm2.py" in names
    assert any("e2e_smollm2[" in p.id for p in sweep_entries())


def field(tree, key: str):
    """A dotted path of a ConfigDict or of its config.json."""
    for part in key.split("."):
        tree = tree[part]
    return tree


def as_written(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("path,index,trains", sweep_entries())
def test_sweep_entry_builds_and_trains(path, index, trains, tmp_path, compile_cache):
    module = sweep.load_experiment(path)
    overrides = sweep.overrides_of(sweep.entries(module, path)[index])
    config = sweep.build_config(module, "runlocal", overrides)  # UserError if invalid
    for key, value in overrides.items():
        assert as_written(field(config, key)) == as_written(value), key
    if not trains:
        return
    with config.unlocked():
        config.train.num_steps = 2
        config.eval.num_examples = 0
        config.eval.eval_untuned = False
        # one batch shape for every step and entry (rows padded to max_len), so entries that
        # compile the same program load it from the cache instead of compiling their shapes
        config.data.bucket_multiple = config.data.max_len
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 2
    with open(tmp_path / "metrics.jsonl") as f:
        losses = [row["train/loss"] for row in map(json.loads, f) if "train/loss" in row]
    assert losses and all(math.isfinite(v) for v in losses)
    with open(tmp_path / "config.json") as f:
        written = json.load(f)  # what the run says it ran with
    for key, value in overrides.items():
        if key in SHORTENED:  # this test's own value, not the entry's
            continue
        assert as_written(field(written, key)) == as_written(value), key
