r"""Prefix tuning of an encoder on your own labelled JSONL data: a 3-way sentiment toy set
shipped with the tests (tests/fixtures/sentiment/{train,dev}.jsonl, rows like
`{"text": "a joy to watch", "label": "positive"}`).

The label set is the train file's (sorted; recorded in the workdir's config.json as
data.labels, and the head's size as model.num_labels). For your own files:
  python -m prefix_jax.main --config=experiments/jsonl_classification_example.py \
    --workdir=runs/my_classifier --config.data.dir=my_data --config.data.label_field=intent
Smoke run on a tiny random BERT (tests, CI):
  python -m prefix_jax.main --config=experiments/jsonl_classification_example.py:runlocal \
    --workdir=/tmp/jsonl_cls

Expected: on 21 training rows the numbers mean little; this file shows the wiring (a prefix and
a fresh head on all-MiniLM-L6-v2, dev accuracy and loss).
"""

import os

import ml_collections

from prefix_jax import configs

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                        "fixtures", "sentiment")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = configs.parse_arg(arg, runlocal=False, prefix_len=16)
    config = ml_collections.ConfigDict()
    config.seed = 0  # prefix and head init, data order, dropout
    config.model = configs.model_config("minilm")  # 'minilm', 'tiny-bert' or an HF BERT dir
    config.model.remat = "none"  # short sequences: activations are small, recompute is waste
    config.model.pooling = "mean"  # 'mean' over real tokens or 'cls'
    config.model.num_labels = 0  # 0 = the number of labels in the train file
    config.model.classifier_dropout = 0.1  # on the pooled vector while training
    config.prefix = configs.prefix_config(arg.prefix_len)
    config.trainable = r"^(prefix/|base/classifier/)"  # regex over param paths: prefix + head
    config.data = configs.jsonl_classification_data(FIXTURES)
    config.optim = configs.optim_config(lr=1e-2)
    config.train = configs.train_config(num_steps=60, batch_size=8)
    config.train.log_every = 10
    config.eval = configs.eval_config(num_examples=0)  # all dev rows
    config.evals = configs.evals_config(dev={"type": "accuracy"})
    config.mesh = configs.mesh_config()
    config.distributed = configs.distributed_config()

    if arg.runlocal:
        config.model.path = "tiny-bert"
        config.data.bucket_multiple = 64  # one batch shape: one compile
        config.train.num_steps = 3
        config.train.log_every = 1
        config.train.checkpoint_every = 3
        config.optim.warmup_steps = 1
        config.eval.eval_untuned = False
    return config.lock()
