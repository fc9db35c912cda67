"""Benchmarks of this checkout, each a tool: `python -m prefix_jax.bench.<name>`.

  train    prefix_jax vs PEFT prefix tuning: tokens/s, arithmetic floor, peak memory
  decode   decoding speed vs transformers' own generate, each in its own process (hf_decode)
  step_profile  XLA's per-op profile of the train step, by class of op
  memory   XLA's memory accounting of the train step under the memory options
  plan     compiled memory plans of 1B-70B Llama shapes on N simulated devices (no weights)

They measure the main job, so they read its experiment file (`--config`, as prefix_jax.main
does) and need the bench extras (torch, peft); run them from the checkout's root.
"""

from __future__ import annotations

import ml_collections
import numpy as np

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


def random_lm_batch(vocab_size: int, batch: int, seq: int) -> dict[str, np.ndarray]:
    """A full (unpadded) language-model batch of random tokens, the last quarter of each row
    the target, in the layout text-to-text tasks collate (tokens, positions, segment ids and
    the target slots the loss reads)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, (batch, seq), dtype=np.int32)
    targets = seq // 4
    return {"tokens": tokens, "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids": np.ones((batch, seq), np.int32),
            "target_index": np.tile(np.arange(seq - targets - 1, seq - 1, dtype=np.int32),
                                    (batch, 1)),
            "target_tokens": tokens[:, -targets:],
            "target_weight": np.ones((batch, targets), np.float32)}
