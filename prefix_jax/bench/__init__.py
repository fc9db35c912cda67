"""Benchmarks of this checkout, each a tool: `python -m prefix_jax.bench.<name>`.

  train    prefix_jax vs PEFT prefix tuning: tokens/s, arithmetic floor, peak memory
  decode   decoding speed vs transformers' own generate, each in its own process (hf_decode)
  step_profile  XLA's per-op profile of the train step, by class of op
  memory   XLA's memory accounting of the train step under the memory options

They measure the main job, so they read its experiment file (`--config`, as prefix_jax.main
does) and need the bench extras (torch, peft); run them from the checkout's root.
"""

from __future__ import annotations

import ml_collections

MAIN_EXPERIMENT = "experiments/e2e_smollm2.py"


def experiment_config(spec: str, model: str) -> ml_collections.ConfigDict:
    """The experiment `FILE[:ARG]`, unlocked, on `model` (a tiny model takes the file's
    `runlocal` variant when no ARG is given)."""
    from prefix_jax import cli, sweep

    path, arg = cli.split_config(spec)
    if arg is None and model.startswith("tiny"):
        arg = "runlocal"
    config = sweep.get_config(sweep.load_experiment(path), arg)
    config.unlock()
    config.model.path = model
    return config
