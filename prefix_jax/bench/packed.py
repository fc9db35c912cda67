r"""Wall time of a low-data sweep trained packed (one program) vs one run after another.

  JAX_PLATFORMS=cpu python -m prefix_jax.bench.packed --sizes=50,100 --subsets=2 --num_steps=10
  python -m prefix_jax.bench.packed --sizes=50,100,200,500 --subsets=5 --seeds=2 \
      --num_steps=200 --pack_max=8        # the full low-data sweep (hours on a 2-core CPU)

Both sides train the same runs of the experiment's low-data protocol (experiments/sweeps.py
low_data: sizes x subsets x seeds), in fresh workdirs under --workroot, in this process:
first each run with `train.train_and_evaluate` (the model loaded and the step compiled per run,
as a sweep does it; the Python and JAX start-up of a sweep's separate processes is not counted,
which favours one-by-one), then the same runs with `train_packed` in groups of --pack_max.
Evaluation is off (eval.num_examples=0, no untuned baseline): the measured work is loading,
compiling and training. Prints both wall times side by side and their ratio, how many more token
positions the packed programs compute (each step pads the group's batches to the widest), and
the largest relative difference between the two sides' final train losses (they compute the
same runs).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import flags

from prefix_jax import bench, cli

FLAGS = cli.flag_values()
_CONFIG = flags.DEFINE_string("config", bench.MAIN_EXPERIMENT, "The experiment FILE[:ARG].",
                              flag_values=FLAGS)
_MODEL = flags.DEFINE_string("model", "smollm2", "model.path.", flag_values=FLAGS)
_SIZES = flags.DEFINE_list("sizes", ["50", "100"], "data.train_examples values.",
                           flag_values=FLAGS)
_SUBSETS = flags.DEFINE_integer("subsets", 2, "Random subsets per size.", flag_values=FLAGS)
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per subset.", flag_values=FLAGS)
_NUM_STEPS = flags.DEFINE_integer("num_steps", 10, "Train steps of every run.",
                                  flag_values=FLAGS)
_PACK_MAX = flags.DEFINE_integer("pack_max", 8, "Runs per packed program.", flag_values=FLAGS)
_BUCKET = flags.DEFINE_integer("bucket_multiple", 0, "data.bucket_multiple of every run; "
                               "0: the experiment's. Setting it to data.max_len gives one batch "
                               "shape (one compile per program), isolating the step time.",
                               flag_values=FLAGS)
_WORKROOT = flags.DEFINE_string("workroot", None, "Where the runs' workdirs go (default: a "
                                "new temporary directory).", flag_values=FLAGS)


def _configs():
    from experiments import sweeps
    from prefix_jax import sweep

    entries = sweeps.low_data([int(s) for s in _SIZES.value], _SUBSETS.value, _SEEDS.value)
    configs_ = []
    for entry in entries:
        config = bench.experiment_config(_CONFIG.value, _MODEL.value)
        sweep.apply_overrides(config, sweep.overrides_of(entry))
        config.train.num_steps = _NUM_STEPS.value
        config.train.checkpoint_every = _NUM_STEPS.value
        config.train.log_every = _NUM_STEPS.value
        config.train.eval_every = 0
        config.eval.num_examples = 0
        config.eval.eval_untuned = False
        if _BUCKET.value:
            config.data.bucket_multiple = _BUCKET.value
        configs_.append(config)
    return configs_


def _padded_positions(configs_) -> float:
    """Token positions the packed programs compute over those of the runs alone: each packed
    step pads the group's batches to the widest (`train_packed.stack_batches`). Counted on the
    runs' own data streams, the pipeline alone (no training)."""
    from prefix_jax import models, tasks, train_packed

    tokenizer = models.load(configs_[0].model, configs_[0].seed).tokenizer
    streams = [train_packed.run_stream(c, tasks.get(c), tokenizer) for c in configs_]
    alone = packed = 0
    for first in range(0, len(streams), _PACK_MAX.value):
        group = streams[first:first + _PACK_MAX.value]
        for _ in range(_NUM_STEPS.value):
            batches = [next(it) for it in group]
            alone += sum(b["segment_ids"].size for b in batches)
            packed += train_packed.stack_batches(batches)["segment_ids"].size
    return packed / alone


def _final_loss(workdir: str) -> float:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["train/loss"] for r in rows if "train/loss" in r][-1]


def main() -> None:
    from prefix_jax import train, train_packed

    if _PACK_MAX.value < 1 or _NUM_STEPS.value < 1:
        cli.fail("--pack_max and --num_steps must be at least 1")
    root = _WORKROOT.value or tempfile.mkdtemp(prefix="bench_packed_")
    if os.path.exists(root) and os.listdir(root):
        cli.fail(f"--workroot={root} is not empty; give a new directory (runs there would "
                 "resume instead of training)")
    configs_ = _configs()
    problem = train_packed.packing_problem(configs_)
    if problem:
        cli.fail(f"the runs cannot be packed: {problem}")
    padding = _padded_positions(configs_)  # before the clocks start
    alone = [os.path.join(root, "alone", str(i)) for i in range(len(configs_))]
    packed = [os.path.join(root, "packed", str(i)) for i in range(len(configs_))]

    started = time.perf_counter()
    for config, workdir in zip(configs_, alone):
        train.train_and_evaluate(config, workdir)
    one_by_one = time.perf_counter() - started

    started = time.perf_counter()
    for first in range(0, len(configs_), _PACK_MAX.value):
        group = slice(first, first + _PACK_MAX.value)
        train_packed.train_packed(configs_[group], packed[group])
    together = time.perf_counter() - started

    differences = [abs(_final_loss(p) - _final_loss(a)) / abs(_final_loss(a))
                   for a, p in zip(alone, packed)]
    c = configs_[0]
    print(f"\n{len(configs_)} runs (sizes {','.join(_SIZES.value)} x {_SUBSETS.value} subsets x "
          f"{_SEEDS.value} seeds) of {_NUM_STEPS.value} steps, batch {c.train.batch_size}, "
          f"model {c.model.path}, prefix {c.prefix.mode} P={c.prefix.length}, bucket "
          f"{c.data.bucket_multiple} of max_len {c.data.max_len}, "
          f"{os.cpu_count()} CPUs; workdirs under {root}")
    print(f"packed programs compute {padding:.3f}x the token positions of the runs alone "
          "(each step's batches padded to the group's widest)")
    print(f"| one by one | packed (<= {_PACK_MAX.value} per program) | ratio |")
    print("|---|---|---|")
    print(f"| {one_by_one:.1f} s | {together:.1f} s | {one_by_one / together:.2f}x |")
    print(f"largest relative difference of a run's final train loss, packed vs alone: "
          f"{max(differences):.2e}")


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
