r"""Prefix tuning on your own JSONL data: country -> capital, a small file shipped with the tests.

The data is tests/fixtures/capitals/{train,dev,test}.jsonl, rows like
`{"country": "France", "capital": "Paris"}` (a list of strings is several references). For your
own files, keep this config and point it at them:
  python -m prefix_jax.main --config=experiments/jsonl_example.py --workdir=runs/my_task \
    --config.data.dir=my_data --config.data.source_field=question \
    --config.data.target_field=answer --config.data.prompt='{source}\nAnswer:'
Smoke run on a tiny random model (tests, CI):
  python -m prefix_jax.main --config=experiments/jsonl_example.py:runlocal --workdir=/tmp/jsonl

Evaluators (config.evals): during training, greedy decoding of the dev set scored by exact match
and BLEU, and the dev set's teacher-forced loss; after training, the test set with the
task's reportable set (BLEU, ROUGE-L, exact match).

Expected: SmolLM2 answers most capitals without a prefix; a 10-slot prefix trained for 100
steps teaches it the bare "Answer: <city>" format (exact match on dev). Runlocal on the tiny
random model only shows that the pipeline runs (scores near 0).
"""

import os

import ml_collections

from prefix_jax import configs

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                        "fixtures", "capitals")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = configs.parse_arg(arg, runlocal=False, prefix_len=10)
    config = ml_collections.ConfigDict()
    config.seed = 0  # prefix init and batch order
    config.model = configs.model_config("smollm2")  # or an HF Llama-family dir / a .gguf file
    config.prefix = configs.prefix_config(arg.prefix_len)
    config.trainable = r"^prefix/"  # regex over "/"-joined param paths; matches train
    config.data = configs.jsonl_data(FIXTURES, prompt="What is the capital of {source}?\nAnswer:")
    config.data.source_field = "country"
    config.data.target_field = "capital"
    config.data.max_len = 64
    config.optim = configs.optim_config(lr=2e-2)
    config.train = configs.train_config(num_steps=100, batch_size=8)
    config.train.log_every = 10
    config.train.eval_every = 50
    config.eval = configs.eval_config(num_examples=0)  # all dev sources
    config.eval.max_new_tokens = 12
    config.eval.num_samples = 3
    config.evals = configs.evals_config(
        dev={"type": "generation", "metrics": "exact_match,bleu"},
        dev_loss={"type": "loss"},
        test={"type": "generation", "phase": "end", "metrics": "report", "num_beams": 1},
    )
    config.mesh = configs.mesh_config()
    config.distributed = configs.distributed_config()

    if arg.runlocal:
        config.model.path = "tiny"
        config.data.max_len = 96  # byte-level tokenizer: the longest prompt+answer fits
        config.data.bucket_multiple = 96  # one batch shape: one compile
        config.train.num_steps = 6
        config.train.batch_size = 4
        config.train.log_every = 2
        config.train.eval_every = 0
        config.train.checkpoint_every = 6
        config.optim.lr = 0.1  # the tiny random model needs a large step to move
        config.optim.warmup_steps = 1
        config.eval.max_new_tokens = 8
        config.eval.num_samples = 1
        config.eval.eval_untuned = False
    return config.lock()
