"""Reusable SWEEP pieces (see scripts/sweep.py): lists of override dicts keyed by dotted config
paths, each with a "name" (the sweep group, not a config field)."""

from __future__ import annotations


def lengths(values: tuple[int, ...] = (1, 5, 10, 20, 40)) -> list[dict]:
    return [{"name": "length", "prefix.length": n} for n in values]


def depths(values: tuple[str, ...] = ("top:50%", "bottom:50%", "top:25%", "bottom:25%")
           ) -> list[dict]:
    return [{"name": "depth", "prefix.layers": v} for v in values]


def inits(values: tuple[str, ...] = ("random", "vocab", "text")) -> list[dict]:
    return [{"name": "init", "prefix.init": v} for v in values]


def low_data(sizes: tuple[int, ...] = (50, 100, 200, 500), subsamples: int = 5,
             seeds: int = 2) -> list[dict]:
    """Li & Liang's low-data protocol: each size x 5 random subsets x 2 seeds."""
    return [{"name": "low_data", "data.train_examples": n, "data.subsample_seed": s, "seed": k}
            for n in sizes for s in range(subsamples) for k in range(seeds)]
