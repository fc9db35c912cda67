r"""Baseline: head only. all-MiniLM-L6-v2 frozen, no prefix; only the linear head on the
mean-pooled sentence embedding trains (a linear probe of the sentence embeddings).

Launch:
  python -m prefix_jax.main --config=experiments/sst2_minilm_head.py --workdir=runs/sst2_head
Smoke run: --config=experiments/sst2_minilm_head.py:runlocal

Expected: below the prefix-tuned model (docs/sst2.md has the measured numbers).
"""

import ml_collections

from experiments import sst2_minilm_prefix


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = sst2_minilm_prefix.get_config(arg).unlock()
    config.prefix.length = 0  # no prefix: the frozen encoder as it is
    config.trainable = r"^base/classifier/"
    config.optim.lr = 1e-2  # a linear head on fixed features tolerates a large step
    return config.lock()
