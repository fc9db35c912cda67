r"""Fine-tune the top 2 layers (Li & Liang, Table 2 "FT-top2"): the trainable regex selects two
rows of every stacked layer leaf (`base/layers/-1/...`, `-2`: the top layers, for any depth);
the optimizer keeps the other layers bitwise unchanged.

Paper E2E BLEU (GPT-2 medium): 68.1 vs full fine-tune 68.8 and prefix 70.3.

  python -m prefix_jax.main --config=experiments/e2e_finetune_top2.py --workdir=runs/e2e_ft_top2
"""

import ml_collections

from experiments import e2e_finetune, sweeps


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = e2e_finetune.get_config(arg).unlock()
    config.trainable = r"^base/layers/-[12]/"
    return config.lock()


SWEEP = sweeps.low_data()
