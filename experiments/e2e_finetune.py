r"""Full fine-tuning baseline (Li & Liang, Table 2 "fine-tune"): every base weight trains, no
prefix, through the same train loop (chosen by the `trainable` regex). Checkpoints hold the
whole model.

Paper settings: lr 5e-5, batch 10, 5 epochs. Paper E2E BLEU (GPT-2 medium): 68.8 vs prefix 70.3.

  python -m prefix_jax.main --config=experiments/e2e_finetune.py --workdir=runs/e2e_finetune
"""

import ml_collections

from experiments import e2e_smollm2, sweeps
from prefix_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = e2e_smollm2.get_config(arg).unlock()
    config.prefix.length = 0
    config.prefix.init = "random"
    config.trainable = r"^base/"
    config.optim.lr = 1e-4  # Li & Liang: 5e-5 for 5 epochs; a short CPU budget needs more
    if configs.parse_arg(arg, runlocal=False, prefix_len=10).runlocal:
        config.optim.lr = 1e-2
    return config.lock()


SWEEP = sweeps.low_data()
