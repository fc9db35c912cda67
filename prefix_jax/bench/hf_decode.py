"""The transformers side of `prefix_jax.bench.decode`, run in its own process.

  python -m prefix_jax.bench.hf_decode JOB_DIR THREADS

It imports torch and transformers only (no JAX, and nothing from prefix_jax, whose modules may
import JAX), so the baseline owns its process and its threads as a new user's script would:
the process is pinned to the first THREADS CPUs and torch uses THREADS intra-op threads. The
job (written by prefix_jax.bench.decode) is `job.json` (the GGUF file, the workloads, the
settings) and `job.npz` (the prefix keys/values and each workload's left-padded prompts). For
each workload it runs transformers' own `generate` once untimed, then `rounds` timed times,
and writes the tokens (`hf_<THREADS>.npz`) and the seconds of each round (`hf_<THREADS>.json`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def _pin(threads: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)


def _prefix_cache(hf, k: np.ndarray, v: np.ndarray, rows: int):
    """A DynamicCache holding the prefix (`[L, 1, P, K, D]` -> per layer `[rows, K, P, D]`)."""
    import torch
    import transformers

    cache = transformers.DynamicCache(config=hf.config)
    k = torch.from_numpy(k).permute(0, 1, 3, 2, 4).expand(-1, rows, -1, -1, -1)
    v = torch.from_numpy(v).permute(0, 1, 3, 2, 4).expand(-1, rows, -1, -1, -1)
    for layer in range(k.shape[0]):
        cache.update(k[layer].contiguous(), v[layer].contiguous(), layer)
    return cache


def generate(hf, tokens: np.ndarray, valid: np.ndarray, prefix: tuple | None, num_beams: int,
             max_new: int, pad_id: int) -> np.ndarray:
    """transformers' `generate` for exactly `max_new` tokens (no stop token), greedy or beam.

    With a prefix: it continues from a cache that already holds the P prefix slots (how PEFT
    feeds a prefix); `generate` skips the input ids the cache holds, so P placeholder ids stand
    for them, with attention mask 1 (positions, from the mask, start at P). Beam search expands
    the inputs to rows `prompt * W + beam`, so the cache is built with that many rows.
    """
    import torch

    b = tokens.shape[0]
    ids = torch.from_numpy(tokens).long()
    mask = torch.from_numpy(valid).long()
    kwargs = {}
    if prefix is not None:
        n_prefix = prefix[0].shape[2]
        ids = torch.cat([torch.full((b, n_prefix), pad_id), ids], 1)
        mask = torch.cat([torch.ones(b, n_prefix, dtype=torch.long), mask], 1)
        kwargs["past_key_values"] = _prefix_cache(hf, *prefix, b * num_beams)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new,
                          min_new_tokens=max_new, do_sample=False, num_beams=num_beams,
                          early_stopping=False, length_penalty=1.0, eos_token_id=None,
                          pad_token_id=pad_id, **kwargs)
    return out[:, ids.shape[1]:].numpy()


def main(job_dir: str, threads: int) -> None:
    _pin(threads)
    import torch
    import transformers

    torch.set_num_threads(threads)
    with open(os.path.join(job_dir, "job.json")) as f:
        job = json.load(f)
    arrays = np.load(os.path.join(job_dir, "job.npz"))
    path = job["gguf"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    prefix = (arrays["prefix_k"], arrays["prefix_v"])
    tokens_out, seconds = {}, {}
    for work in job["workloads"]:
        name = work["name"]
        args = (hf, arrays[f"{name}_tokens"], arrays[f"{name}_valid"],
                prefix if work["prefix"] else None, work["num_beams"], job["max_new_tokens"],
                job["pad_id"])
        tokens_out[name] = generate(*args)  # warm-up, and the tokens to compare
        seconds[name] = []
        for _ in range(job["rounds"]):
            start = time.perf_counter()
            generate(*args)
            seconds[name].append(time.perf_counter() - start)
        print(f"hf threads={threads} {name}: {seconds[name]}", flush=True)
    np.savez(os.path.join(job_dir, f"hf_{threads}.npz"), **tokens_out)
    with open(os.path.join(job_dir, f"hf_{threads}.json"), "w") as f:
        json.dump({"seconds": seconds, "torch": torch.__version__,
                   "transformers": transformers.__version__,
                   "torch_threads": torch.get_num_threads()}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
