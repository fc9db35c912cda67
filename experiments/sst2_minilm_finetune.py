r"""Baseline: full fine-tuning. Every weight of all-MiniLM-L6-v2 and the head trains, no prefix
(the upper reference that prefix tuning approaches with 0.3% of the parameters).

Launch:
  python -m prefix_jax.main --config=experiments/sst2_minilm_finetune.py --workdir=runs/sst2_ft
Smoke run: --config=experiments/sst2_minilm_finetune.py:runlocal

Expected: the best of the three on dev (docs/sst2.md has the measured numbers).
"""

import ml_collections

from experiments import sst2_minilm_prefix


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = sst2_minilm_prefix.get_config(arg).unlock()
    config.prefix.length = 0
    config.trainable = r"^base/"  # the whole encoder and the head
    config.optim.lr = 5e-5  # usual BERT fine-tuning range (2e-5 .. 5e-5)
    config.optim.weight_decay = 0.01
    return config.lock()
