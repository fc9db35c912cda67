r"""The low-data experiment of issue 16 (Li & Liang, section 7.3) on SmolLM2 and E2E, as one SWEEP.

Training sets of 50/100/200/500 E2E pairs (`data.train_examples`, random subsets chosen by
`data.subsample_seed`), scored on the same fixed dev subset (the first 300 dev MRs in file order,
greedy, every run). Methods:
  prefix      prefix tuning, P=10, real-word init ("table-to-text:"), 5 subsets x 2 seeds
  prefix_rnd  the same with random init, 5 subsets x 2 seeds
  prompt      prompt tuning (embeddings at the input only, P=10, real-word init), 2 subsets x 1 seed
  finetune    full fine-tuning, 2 subsets x 1 seed
Prompt tuning and fine-tuning get 2 subsets x 1 seed each: fine-tuning trains every weight of the
base, so it cannot share one (it is never packed) and costs several prefix runs per run.
Training length, fixed before any result was seen (batch 8, linear warmup 10 steps then linear
decay to 0): STEPS below, i.e. 16 / 12 / 8 / 4.8 epochs for 50 / 100 / 200 / 500 examples.
The two prefix methods differ only in per-run fields, so the sweep packs them: with
--pack_max=4, one program per size and replicate block (see _entries for the order, which a
larger --pack_max would merge across blocks). The sweep also packs the two prompt-tuning
subsets of one size together (the second is the next entry of that shape and length), so both
run after the first block; fine-tuning keeps the SWEEP order. See docs/low_data.md for the
commands and the protocol.
Result (all 96 runs, docs/low_data.md): dev BLEU, real-word / random init, 45.9 / 42.3, 51.0 /
48.2, 57.8 / 51.9, 59.0 / 56.0 at 50 / 100 / 200 / 500 examples (mean of 10); real-word init
ahead in 37 of 40 paired runs.

  python -m prefix_jax.sweep --config=experiments/e2e_low_data.py --root=runs/sweeps --pack_max=4
  bash scripts/low_data_report.sh runs/sweeps/e2e_low_data docs/low_data   # table, figure, paired
Smoke (tiny random model, runlocal sizes):
  python -m prefix_jax.sweep --config=experiments/e2e_low_data.py:runlocal --root=/tmp/sweeps \
      --filter='^prefix$'
"""

import ml_collections

from experiments import e2e_smollm2
from prefix_jax import configs

SIZES = (50, 100, 200, 500)
STEPS = {50: 100, 100: 150, 200: 200, 500: 300}  # train.num_steps per training-set size
DEV_MRS = 300  # the fixed dev subset: the first 300 MRs of devset.csv, for every run

METHODS = {
    "prefix": {"prefix.init": "text"},
    "prefix_rnd": {"prefix.init": "random"},
    "prompt": {"prefix.mode": "input", "prefix.positions": "after_prefix", "optim.lr": 1e-2},
    "finetune": {"prefix.length": 0, "prefix.init": "random", "trainable": r"^base/",
                 "optim.lr": 1e-4},
}
REPLICATES = {"prefix": (5, 2), "prefix_rnd": (5, 2), "prompt": (2, 1), "finetune": (2, 1)}
REPLICATE_BLOCK = 2  # (subset, seed) pairs per block of the sweep order (see _entries)


def _entries() -> list[dict]:
    """Every (method, size, subset, seed) entry once, ordered so that a sweep stopped at the
    end of a block is balanced: replicate pairs (subset, seed) come in blocks of
    REPLICATE_BLOCK, subsets before seeds; each block gives every (prefix method, size) cell
    REPLICATE_BLOCK more runs, and one fine-tuning and one prompt-tuning subset follow each of
    the first blocks. Within a block the two prefix methods of one size are adjacent and of one
    length, so the sweep packs them as one program of 2 x REPLICATE_BLOCK runs."""
    def entry(method: str, size: int, subset: int, seed: int) -> dict:
        return {"name": method, **METHODS[method], "data.train_examples": size,
                "data.subsample_seed": subset, "seed": seed, "train.num_steps": STEPS[size]}

    def pairs(method: str) -> list[tuple[int, int]]:
        subsets, seeds = REPLICATES[method]
        return [(subset, seed) for seed in range(seeds) for subset in range(subsets)]

    prefix_pairs = pairs("prefix")
    blocks = [prefix_pairs[i:i + REPLICATE_BLOCK]
              for i in range(0, len(prefix_pairs), REPLICATE_BLOCK)]
    baseline_pairs = {method: pairs(method) for method in ("finetune", "prompt")}
    entries = []
    for i, block in enumerate(blocks):
        for size in SIZES:
            entries += [entry(method, size, subset, seed) for method in ("prefix", "prefix_rnd")
                        for subset, seed in block]
        for method, method_pairs in baseline_pairs.items():
            if i < len(method_pairs):
                subset, seed = method_pairs[i]
                entries += [entry(method, size, subset, seed) for size in SIZES]
    return entries


SWEEP = _entries()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = e2e_smollm2.get_config(arg).unlock()
    config.eval.num_examples = DEV_MRS
    config.eval.eval_untuned = False  # the same untuned score for every run: computed once
    config.train.eval_every = 0
    config.train.log_every = 10
    config.train.checkpoint_every = 100
    if configs.parse_arg(arg, runlocal=False, prefix_len=10).runlocal:
        config.eval.num_examples = 4
    return config.lock()
