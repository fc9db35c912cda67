r"""Infix tuning (Li & Liang, Table 5): the trainable slots sit between source and target, so
only the queries that predict the target see them (here: from the last source token on).

Paper (GPT-2 medium, E2E BLEU): 1 / 10 / 20 tokens: 67.9 / 67.2 / 66.7 vs prefix 70.3.

  python -m prefix_jax.main --config=experiments/e2e_infix.py --workdir=runs/e2e_infix
"""

import ml_collections

from experiments import e2e_smollm2, sweeps


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = e2e_smollm2.get_config(arg).unlock()
    config.prefix.placement = "infix"
    return config.lock()


SWEEP = sweeps.lengths() + sweeps.depths() + sweeps.inits() + sweeps.low_data()
