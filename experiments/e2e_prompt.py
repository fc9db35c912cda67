r"""Prompt tuning (Li & Liang's "embedding-only", Table 5; Lester et al. 2021): trainable
embeddings at the input only, the rest as experiments/e2e_smollm2.py. Shows what depth buys.

Paper (GPT-2 medium, E2E BLEU): 1 / 10 / 20 tokens: 48.1 / 62.2 / 61.9 vs prefix 70.3.

  python -m prefix_jax.main --config=experiments/e2e_prompt.py --workdir=runs/e2e_prompt
"""

import ml_collections

from experiments import e2e_smollm2, sweeps
from prefix_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = e2e_smollm2.get_config(arg).unlock()
    config.prefix.mode = "input"
    config.prefix.positions = "after_prefix"  # real tokens follow the prompt
    config.prefix.init = "text"  # embeddings of "table-to-text:" (Lester et al.: real words)
    config.optim.lr = 1e-2
    if configs.parse_arg(arg, runlocal=False, prefix_len=10).runlocal:
        config.prefix.init = "vocab"
        config.optim.lr = 0.1
    return config.lock()


SWEEP = sweeps.lengths() + sweeps.inits() + sweeps.low_data()
