"""Builders of `SWEEP` lists: the ablations of the Prefix-Tuning paper as config overrides.

The SWEEP contract (read by prefix_jax.sweep and tests/test_experiments.py): an experiment file
`experiments/NAME.py` has `get_config(arg)` and may have a module-level `SWEEP`, a list of dicts.
Each dict is one run: its keys are dotted config paths (`"prefix.length"`, `"seed"`) and its
values replace that field of `get_config(arg)`, exactly as `--config.prefix.length=5` would. The
key `"name"` is not a config field: it names the entry's group ("length", "low_data", ...) so
that `prefix_jax.sweep --filter` can pick groups. An empty dict (besides "name") is the
experiment's own config. More in experiments/README.md.

    SWEEP = sweeps.lengths() + sweeps.low_data()
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

from prefix_jax.sweep import GROUP_KEY as NAME  # an entry's group (not a config field)


def over(name: str, path: str, values: Iterable[Any]) -> list[dict[str, Any]]:
    """One entry per value of the config field `path`, in group `name`."""
    return [{NAME: name, path: value} for value in values]


def lengths(values: Sequence[int] = (1, 5, 10, 20, 40)) -> list[dict[str, Any]]:
    """Prefix length P (Li & Liang: table-to-text peaks near 10; see ../shared/REFERENCE.md)."""
    return over("length", "prefix.length", values)


def low_data(sizes: Sequence[int] = (50, 100, 200, 500), subsamples: int = 5,
             seeds: int = 2) -> list[dict[str, Any]]:
    """The paper's low-data protocol: each training-set size x `subsamples` random subsets of
    the training data (`data.subsample_seed`) x `seeds` init/order seeds (`seed`)."""
    return [{NAME: "low_data", "data.train_examples": size, "data.subsample_seed": subsample,
             "seed": seed}
            for size, subsample, seed in itertools.product(sizes, range(subsamples),
                                                           range(seeds))]



def depths(values: Sequence[str] = ("top:50%", "bottom:50%", "top:25%", "bottom:25%")
           ) -> list[dict[str, Any]]:
    """Which layers hold the prefix (`prefix.layers`; fractions work for any depth, so the same
    entries run on the 2-layer test model and on 30-layer SmolLM2)."""
    return over("depth", "prefix.layers", values)


def inits(values: Sequence[str] = ("random", "vocab", "text")) -> list[dict[str, Any]]:
    """Prefix init (Li & Liang: real-word init helps in low-data settings)."""
    return over("init", "prefix.init", values)


def seeds(entries: Iterable[dict[str, Any]], count: int = 3) -> list[dict[str, Any]]:
    """Each entry once per init/order seed 0..count-1 (replicates that compare.py groups and
    the sweep packs into one program)."""
    return [{**entry, "seed": seed} for entry in entries for seed in range(count)]

