r"""Decoding speed of prefix_jax against transformers' own `generate`, same SmolLM2-135M weights.

  python -m prefix_jax.bench.decode                      # batch 1 and 16, beam 5 at batch 10
  python -m prefix_jax.bench.decode --threads=1,2 --rounds=3 --workdir=runs/e2e_smollm2

Each side runs in its own process, pinned to the first T CPUs for each T of `--threads`:
prefix_jax in a worker of this module (`--worker_job`), transformers in
`prefix_jax.bench.hf_decode`, which imports no JAX, so neither shares a process or a thread
pool with the other. The parent only writes the job (the prefix and the left-padded prompts:
the first E2E dev MRs) and prints the table.

Workloads, each for exactly `--max_new_tokens` tokens (no stop token, so both sides do the
same work), on the same prompts:
- greedy with the prefix, at each `--batch_sizes`: transformers continues from a
  `DynamicCache` that already holds the prefix keys/values, as PEFT feeds a prefix (positions
  after the prefix on both sides; not `PeftModel.generate`, which drops a prefix-tuning adapter
  with peft 0.21.2, see tests/test_peft_generate.py);
- greedy without a prefix (the base model alone, transformers' plain `generate`): a lower bound
  on transformers' cost, since a prefix only adds P keys;
- beam search (`--num_beams`, length penalty 1) at `--beam_batch_size`, with and without the
  prefix.
Every workload checks that transformers' tokens equal prefix_jax's, row by row. Medians of
`--rounds` timed rounds after one untimed run (prefix_jax's compile).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags

from prefix_jax import cli

FLAGS = cli.flag_values()
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Greedy batch sizes.",
                                 flag_values=FLAGS)
_BEAM_BATCH_SIZE = flags.DEFINE_integer("beam_batch_size", 10, "Prompts per beam-search batch; "
                                        "0 = no beam workload.", flag_values=FLAGS)
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 5, "Beams of the beam workload.",
                                  flag_values=FLAGS)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per row.",
                                       flag_values=FLAGS)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (the median is reported).",
                               flag_values=FLAGS)
_THREADS = flags.DEFINE_list("threads", ["1", "2"], "CPU threads of each side, one sweep "
                             "point each (the process is pinned to that many CPUs).",
                             flag_values=FLAGS)
_PREFIX_LENGTH = flags.DEFINE_integer("prefix_length", 10, "Slots of the untrained prefix "
                                      "(without --workdir).", flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Use this run's trained prefix.",
                               flag_values=FLAGS)
_WORKER_JOB = flags.DEFINE_string("worker_job", None, "Internal: run the prefix_jax side of "
                                  "this job directory.", flag_values=FLAGS)
_WORKER_THREADS = flags.DEFINE_integer("worker_threads", 1, "Internal: the worker's threads.",
                                       flag_values=FLAGS)


def _ints(values: list[str], flag: str) -> list[int]:
    try:
        out = [int(v) for v in values]
    except ValueError:
        cli.fail(f"--{flag}={','.join(values)} must be integers, e.g. 1,16")
    if not out or min(out) < 1:
        cli.fail(f"--{flag}={','.join(values)} must be positive integers, e.g. 1,16")
    return out


def write_job(job_dir: str, batch_sizes: list[int]) -> list[dict]:
    """The prefix, the prompts of every workload and the settings, for both workers."""
    from prefix_jax import configs, models, prefix
    from prefix_jax.serving import bank, decoding
    from prefix_jax.tasks import e2e

    base = models.load(configs.model_config("smollm2"))
    if _WORKDIR.value:
        kv = bank.load([_WORKDIR.value]).row(0)
    else:
        kv = prefix.text_activations(base, "table-to-text:", _PREFIX_LENGTH.value)
    pad_id = models.pad_id(base.tokenizer)
    sources, _ = e2e.group_references(e2e.read_pairs(configs.default_data_dir("e2e"), "dev"))
    workloads = []
    for b in batch_sizes:
        workloads += [dict(name=f"greedy{b}_prefix", batch=b, num_beams=1, prefix=True),
                      dict(name=f"greedy{b}_base", batch=b, num_beams=1, prefix=False)]
    if _BEAM_BATCH_SIZE.value:
        b, w = _BEAM_BATCH_SIZE.value, _NUM_BEAMS.value
        workloads += [dict(name=f"beam{w}x{b}_prefix", batch=b, num_beams=w, prefix=True),
                      dict(name=f"beam{w}x{b}_base", batch=b, num_beams=w, prefix=False)]
    arrays = {"prefix_k": np.asarray(kv.k, np.float32), "prefix_v": np.asarray(kv.v, np.float32)}
    for work in workloads:
        ids = base.tokenizer([e2e.format_source(s) for s in sources[:work["batch"]]],
                             add_special_tokens=False).input_ids
        arrays[f"{work['name']}_tokens"], arrays[f"{work['name']}_valid"] = decoding.left_pad(
            ids, pad_id)
    np.savez(os.path.join(job_dir, "job.npz"), **arrays)
    with open(os.path.join(job_dir, "job.json"), "w") as f:
        json.dump({"gguf": models.smollm2_gguf_path(), "workloads": workloads,
                   "max_new_tokens": _MAX_NEW_TOKENS.value, "pad_id": pad_id,
                   "rounds": _ROUNDS.value}, f)
    return workloads


def jax_worker(job_dir: str, threads: int) -> None:
    """The prefix_jax side of a job: tokens, seconds per round and XLA's temporary memory."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    import jax
    import jax.numpy as jnp

    from prefix_jax import configs, models, prefix
    from prefix_jax.models.core import KV
    from prefix_jax.serving import decoding

    with open(os.path.join(job_dir, "job.json")) as f:
        job = json.load(f)
    arrays = np.load(os.path.join(job_dir, "job.npz"))
    base = models.load(configs.model_config("smollm2"))
    kv = KV(jnp.asarray(arrays["prefix_k"]), jnp.asarray(arrays["prefix_v"]))
    tokens_out, seconds, temp_mib = {}, {}, {}
    for work in job["workloads"]:
        name = work["name"]
        n_prefix = kv.k.shape[2] if work["prefix"] else 0
        settings = decoding.DecodeSettings(
            max_new_tokens=job["max_new_tokens"], pad_id=job["pad_id"],
            num_beams=work["num_beams"], length_penalty=1.0,
            prefix=prefix.DecodeOptions(position_offset=n_prefix))
        args = (base.module, base.params, kv if work["prefix"] else None,
                jnp.asarray(arrays[f"{name}_tokens"]), jnp.asarray(arrays[f"{name}_valid"]),
                settings)
        compiled = decoding.decode.lower(*args).compile()
        temp_mib[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
        tokens_out[name] = np.asarray(decoding.decode(*args).tokens)
        seconds[name] = []
        for _ in range(job["rounds"]):
            start = time.perf_counter()
            jax.block_until_ready(decoding.decode(*args).tokens)
            seconds[name].append(time.perf_counter() - start)
        print(f"prefix_jax threads={threads} {name}: {seconds[name]}", flush=True)
    np.savez(os.path.join(job_dir, f"jax_{threads}.npz"), **tokens_out)
    with open(os.path.join(job_dir, f"jax_{threads}.json"), "w") as f:
        json.dump({"seconds": seconds, "temp_mib": temp_mib, "jax": jax.__version__}, f)


def _run_worker(command: list[str]) -> None:
    done = subprocess.run(command, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if done.returncode:
        sys.exit(f"the benchmark worker failed (exit {done.returncode}): {' '.join(command)}")


def _load(job_dir: str, side: str, threads: int) -> tuple[dict, dict]:
    with open(os.path.join(job_dir, f"{side}_{threads}.json")) as f:
        info = json.load(f)
    return info, dict(np.load(os.path.join(job_dir, f"{side}_{threads}.npz")))


def main() -> None:
    if _WORKER_JOB.value:
        jax_worker(_WORKER_JOB.value, _WORKER_THREADS.value)
        return
    batch_sizes = _ints(_BATCH_SIZES.value, "batch_sizes")
    thread_counts = _ints(_THREADS.value, "threads")
    if _ROUNDS.value < 1 or _MAX_NEW_TOKENS.value < 1 or _NUM_BEAMS.value < 2:
        cli.fail("--rounds and --max_new_tokens must be >= 1 and --num_beams >= 2")
    if len(os.sched_getaffinity(0)) < max(thread_counts):
        cli.fail(f"--threads={','.join(_THREADS.value)} exceeds the "
                 f"{len(os.sched_getaffinity(0))} CPUs this process may use")
    with tempfile.TemporaryDirectory() as job_dir:
        workloads = write_job(job_dir, batch_sizes)
        load = os.getloadavg()
        for threads in thread_counts:
            _run_worker([sys.executable, "-m", "prefix_jax.bench.decode",
                         f"--worker_job={job_dir}", f"--worker_threads={threads}"])
            _run_worker([sys.executable, "-m", "prefix_jax.bench.hf_decode", job_dir,
                         str(threads)])
        print(f"SmolLM2-135M float32, {_MAX_NEW_TOKENS.value} new tokens per row (no stop "
              f"token), first E2E dev MRs; load average before {load[0]:.1f}, after "
              f"{os.getloadavg()[0]:.1f}")
        print("| threads | workload | prefix_jax tok/s | transformers generate tok/s | ratio | "
              "s per prompt (jax, hf) | rows with equal tokens | XLA temp MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for threads in thread_counts:
            jax_info, jax_tokens = _load(job_dir, "jax", threads)
            hf_info, hf_tokens = _load(job_dir, "hf", threads)
            for work in workloads:
                name, b = work["name"], work["batch"]
                jax_s = statistics.median(jax_info["seconds"][name])
                hf_s = statistics.median(hf_info["seconds"][name])
                same = int((jax_tokens[name] == hf_tokens[name]).all(axis=1).sum())
                n = b * _MAX_NEW_TOKENS.value
                print(f"| {threads} | {name} | {n / jax_s:.1f} | {n / hf_s:.1f} | "
                      f"**{hf_s / jax_s:.2f}x** | {jax_s / b:.2f}, {hf_s / b:.2f} | "
                      f"{same}/{b} | {jax_info['temp_mib'][name]:.0f} |")
        print(f"jax {jax_info['jax']}, torch {hf_info['torch']}, transformers "
              f"{hf_info['transformers']}")


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
