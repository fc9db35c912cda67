r"""Prefix tuning (P-tuning v2 style) of all-MiniLM-L6-v2 on SST-2 sentiment classification.

A trainable key/value prefix at every layer of the frozen 6-layer BERT encoder, seen by every
token, plus a fresh linear head on the mean-pooled last hidden states (P-tuning v2 trains the
head too); no MLP reparameterization, head dropout 0.1.

Launch:
  python -m prefix_jax.main --config=experiments/sst2_minilm_prefix.py --workdir=runs/sst2_prefix
Smoke run on a tiny random BERT (tests, CI):
  python -m prefix_jax.main --config=experiments/sst2_minilm_prefix.py:runlocal --workdir=/tmp/s

The SWEEP (P-tuning v2's comparisons, Liu et al. 2022), 3 seeds each: prefix length 8/16/32/64,
depth (the prefix on the top or the bottom half of the layers only), and the baselines head-only
(no prefix, the linear probe of experiments/sst2_minilm_head.py) and full fine-tuning (as
experiments/sst2_minilm_finetune.py). Replicates of one setting train packed (one program):
  python -m prefix_jax.sweep --config=experiments/sst2_minilm_prefix.py --root=runs/sweeps
  python -m prefix_jax.compare --workdir='runs/sweeps/sst2_minilm_prefix/*' --out=docs/sst2_sweep

Expected: >= 85% dev accuracy (872 sentences) within 20 minutes on a 2-core CPU; the measured
numbers and the baselines (experiments/sst2_minilm_head.py, sst2_minilm_finetune.py) are in
docs/sst2.md.
"""

import ml_collections

from experiments import sweeps
from prefix_jax import configs

# The baselines as overrides of this config (their own experiment files hold the same values).
HEAD_ONLY = {"prefix.length": 0, "trainable": r"^base/classifier/"}
FINETUNE = {"prefix.length": 0, "trainable": r"^base/", "optim.lr": 5e-5,
            "optim.weight_decay": 0.01}
SWEEP = sweeps.seeds(
    sweeps.lengths((8, 16, 32, 64))
    + sweeps.over("depth", "prefix.layers", ("top:50%", "bottom:50%"))
    + [{"name": "head_only", **HEAD_ONLY}, {"name": "finetune", **FINETUNE}])


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = configs.parse_arg(arg, runlocal=False, prefix_len=16)
    config = ml_collections.ConfigDict()
    config.seed = 0  # prefix and head init, data order, dropout
    config.model = configs.model_config("minilm")  # 'minilm', 'tiny-bert' or an HF BERT dir
    config.model.remat = "none"  # short sequences: activations are small, recompute is waste
    config.model.pooling = "mean"  # 'mean' over real tokens (how MiniLM was trained) or 'cls'
    config.model.num_labels = 2  # classes of the head
    config.model.classifier_dropout = 0.1  # on the pooled vector while training
    config.prefix = configs.prefix_config(arg.prefix_len)
    config.trainable = r"^(prefix/|base/classifier/)"  # regex over param paths: prefix + head
    config.data = ml_collections.ConfigDict(dict(
        task="sst2",
        dir=configs.default_data_dir("sst2"),  # train.tsv / dev.tsv (sentence<TAB>label)
        extra_dirs="",  # (multi-task E2E only)
        max_len=64,  # tokens per sentence incl. [CLS]/[SEP]; longer ones are truncated
        train_examples=0,  # use only N shuffled training sentences; 0 = all 67,349
        bucket_multiple=8,  # batches are padded to a multiple of this (bounds recompiles)
    ))
    config.optim = configs.optim_config(lr=1e-2)
    config.optim.warmup_steps = 50
    config.train = configs.train_config(num_steps=1500, batch_size=32)
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.eval = configs.eval_config(num_examples=1000)  # the whole dev set (872)
    config.eval.batch_size = 128  # sentences per dev forward pass
    config.mesh = configs.mesh_config()
    config.distributed = configs.distributed_config()

    if arg.runlocal:
        config.model.path = "tiny-bert"
        config.data.max_len = 64  # bytes here (byte-level tokenizer): truncated sentences
        config.data.bucket_multiple = 64  # one batch shape: one compile
        config.data.train_examples = 64
        config.train.num_steps = 3
        config.train.batch_size = 8
        config.train.log_every = 1
        config.train.eval_every = 0
        config.train.checkpoint_every = 3
        config.optim.warmup_steps = 1
        config.eval.num_examples = 16
        config.eval.batch_size = 8
    return config.lock()
