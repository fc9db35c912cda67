r"""Prefix tuning of SmolLM2-135M-Instruct on E2E (the project's main job).

Launch (the demo runs this):
  python -m prefix_jax.main --config=experiments/e2e_smollm2.py --workdir=runs/e2e_smollm2
Smoke run on a tiny random model (tests, CI):
  python -m prefix_jax.main --config=experiments/e2e_smollm2.py:runlocal --workdir=/tmp/e2e_tiny

Every ablation of SWEEP, one run each, then the table and figures:
  python -m prefix_jax.sweep --config=experiments/e2e_smollm2.py --root=runs/sweeps --filter=length
  python -m prefix_jax.compare --workdir='runs/sweeps/e2e_smollm2/*' --out=runs/sweeps/length

Expected: see README.md (dev BLEU of the untuned and the tuned model on 200 dev MRs, greedy).
"""

import ml_collections

from experiments import sweeps
from prefix_jax import configs

# Ablations (prefix_jax.sweep runs them, one workdir each; see experiments/sweeps.py):
# prefix length 1..40, depth, init, and the low-data protocol (50..500 examples x 5 subsets x
# 2 seeds).
SWEEP = sweeps.lengths() + sweeps.depths() + sweeps.inits() + sweeps.low_data()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = configs.parse_arg(arg, runlocal=False, prefix_len=10)
    config = ml_collections.ConfigDict()
    config.seed = 0  # prefix init and batch order (not the train_examples subset)
    config.model = configs.model_config("smollm2")
    config.prefix = configs.prefix_config(arg.prefix_len)
    config.prefix.init = "text"  # activations of "table-to-text:" (starts near the base's loss)
    config.trainable = r"^prefix/"  # regex over "/"-joined param paths; matches train
    config.data = ml_collections.ConfigDict(dict(
        task="e2e",
        dir=configs.default_data_dir("e2e"),  # trainset.csv / devset.csv / testset_w_refs.csv
        extra_dirs="",  # more E2E-format task dirs, comma-separated: one prefix per task
        max_len=128,  # longest source+target in tokens; longer training rows are an error
        train_examples=0,  # use only the first N shuffled training pairs; 0 = all
        subsample_seed=0,  # which random N pairs train_examples takes (apart from seed)
        bucket_multiple=16,  # batches are padded to a multiple of this (bounds recompiles)
    ))
    config.optim = configs.optim_config(lr=2e-2)
    config.train = configs.train_config(num_steps=500, batch_size=8)
    config.train.checkpoint_every = 100
    config.eval = configs.eval_config(num_examples=200)
    config.mesh = configs.mesh_config()  # default: data parallel over every device
    config.distributed = configs.distributed_config()

    if arg.runlocal:
        config.model.path = "tiny"
        config.prefix.init = "random"
        config.data.max_len = 480  # byte-level tokenizer: every E2E training pair fits (<= 459)
        # Byte-level rows are long and varied: in 40 steps, buckets of 16 made 22 batch shapes
        # (22 compiles, 85% of the run's time); buckets of 128 make 3, still varying.
        config.data.bucket_multiple = 128
        config.data.train_examples = 256
        config.train.num_steps = 30
        config.train.batch_size = 4
        config.train.log_every = 5
        config.train.eval_every = 15
        config.train.checkpoint_every = 10
        config.optim.lr = 0.1  # the tiny random model needs a large step to move
        config.eval.num_examples = 4
        config.eval.max_new_tokens = 8
        config.eval.num_samples = 2
    return config.lock()
