r"""Li & Liang's main E2E row: prefix tuning with the MLP reparameterization, on SmolLM2-135M.

Paper settings (Appendix): prefix length 5 (here 10, the length this project's other rows use),
embedding -> Linear(d, 512) -> tanh -> Linear(512, per-layer keys/values), lr 8e-5 for 5 epochs;
on our CPU budget a larger lr. After training, `python -m prefix_jax.eject` drops the MLP.

  python -m prefix_jax.main --config=experiments/e2e_prefix_mlp.py --workdir=runs/e2e_prefix_mlp
  python -m prefix_jax.sweep --config=experiments/e2e_prefix_mlp.py --root=runs/sweeps \
      --filter=length
"""

import ml_collections

from experiments import e2e_smollm2, sweeps
from prefix_jax import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = e2e_smollm2.get_config(arg).unlock()
    config.prefix.reparam = "mlp"
    config.prefix.init = "text"  # the MLP is fitted to the activations of prefix.init_text
    config.optim.lr = 1e-3  # the MLP's weights move the prefix faster than direct parameters
    if configs.parse_arg(arg, runlocal=False, prefix_len=10).runlocal:
        config.prefix.init = "random"
        config.prefix.mlp_hidden = 32
        config.optim.lr = 1e-2
    return config.lock()


SWEEP = sweeps.lengths() + sweeps.depths() + sweeps.inits() + sweeps.low_data()
