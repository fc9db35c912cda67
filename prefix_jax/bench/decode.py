r"""Decoding speed of prefix_jax against transformers, same SmolLM2-135M weights, same prefix.

  python -m prefix_jax.bench.decode                # batch 1 and 16, 64 new tokens, 3 rounds
  python -m prefix_jax.bench.decode --batch_sizes=1,4,16 --rounds=5 --workdir=runs/e2e_smollm2

The baselines are transformers' own LlamaForCausalLM (loaded from the same GGUF file) with a
`DynamicCache` pre-filled with the prefix keys/values, which is how PEFT feeds a prefix (real
tokens' positions start at P; prefix_jax runs with the same convention here): (1) transformers'
`generate` continuing from that cache, (2) a greedy loop over `forward`. Not
`PeftModel.generate`: with peft 0.21.2 and transformers 5.x it silently drops a prefix-tuning
adapter (tests/test_peft_generate.py pins this). The script prints how many rows of each
baseline equal prefix_jax's tokens.

Both run greedy for exactly `--max_new_tokens` tokens (no stop token), so both do the same work.
Rounds alternate between the two and the median round is reported; the ratio is prefix_jax's
tokens/s over each baseline's.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import TYPE_CHECKING

import numpy as np
from absl import flags

from prefix_jax import cli

if TYPE_CHECKING:
    import transformers

    from prefix_jax.models.core import KV
    from prefix_jax.serving import decoding

FLAGS = cli.flag_values()
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes, one table row each.",
                                 flag_values=FLAGS)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per row.",
                                       flag_values=FLAGS)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (the median is reported).",
                               flag_values=FLAGS)
_PREFIX_LENGTH = flags.DEFINE_integer("prefix_length", 10, "Slots of the untrained prefix "
                                      "(without --workdir).", flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Use this run's trained prefix.",
                               flag_values=FLAGS)
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "Torch intra-op threads; 0 = torch's "
                                      "default.", flag_values=FLAGS)


def load_prefix(base) -> KV:
    """A trained prefix (--workdir) or the activations of "table-to-text:" (10 slots)."""
    from prefix_jax import prefix
    from prefix_jax.serving import bank

    if _WORKDIR.value:
        return bank.load([_WORKDIR.value]).row(0)
    return prefix.text_activations(base, "table-to-text:", _PREFIX_LENGTH.value)


def _prefix_cache(hf, kv: KV, b: int) -> transformers.DynamicCache:
    """A DynamicCache holding the prefix (KV [L, 1, P, K, D] -> per layer [B, K, P, D])."""
    import torch
    import transformers

    cache = transformers.DynamicCache(config=hf.config)
    k = torch.from_numpy(np.array(kv.k)).permute(0, 1, 3, 2, 4).expand(-1, b, -1, -1, -1)
    v = torch.from_numpy(np.array(kv.v)).permute(0, 1, 3, 2, 4).expand(-1, b, -1, -1, -1)
    for layer in range(k.shape[0]):
        cache.update(k[layer].contiguous(), v[layer].contiguous(), layer)
    return cache


def hf_generate(hf, kv: KV, tokens: np.ndarray, valid: np.ndarray, max_new: int,
                pad_id: int) -> np.ndarray:
    """transformers' own `generate`, with the prefix as an already-cached stretch of P tokens.

    `generate` skips input ids that the cache already holds, so P placeholder ids stand for the
    prefix; the attention mask is 1 on them, and positions (from the mask) start at P.
    """
    import torch

    b = tokens.shape[0]
    n_prefix = kv.k.shape[2]
    ids = torch.cat([torch.full((b, n_prefix), pad_id), torch.from_numpy(tokens).long()], 1)
    mask = torch.cat([torch.ones(b, n_prefix, dtype=torch.long),
                      torch.from_numpy(valid).long()], 1)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, past_key_values=_prefix_cache(hf, kv, b),
                          max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                          eos_token_id=None, pad_token_id=pad_id)
    return out[:, ids.shape[1]:].numpy()


def hf_forward_loop(hf, kv: KV, tokens: np.ndarray, valid: np.ndarray, max_new: int
                    ) -> np.ndarray:
    """transformers' forward in a greedy loop over a DynamicCache holding the prefix first."""
    import torch

    b = tokens.shape[0]
    n_prefix = kv.k.shape[2]
    cache = _prefix_cache(hf, kv, b)
    valid_t = torch.from_numpy(valid)
    mask = torch.cat([torch.ones(b, n_prefix, dtype=torch.long), valid_t.long()], dim=1)
    positions = (valid_t.long().cumsum(1) - 1).clamp(min=0) + n_prefix
    out = np.zeros((b, max_new), np.int64)
    with torch.inference_mode():
        logits = hf(input_ids=torch.from_numpy(tokens).long(), attention_mask=mask,
                    position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1).logits[:, -1]
        position = positions[:, -1:]
        for i in range(max_new):
            token = logits.argmax(-1)
            out[:, i] = token.numpy()
            if i == max_new - 1:
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
            position = position + 1
            logits = hf(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                        cache=cache, use_cache=True).logits[:, -1]
    return out


def main() -> None:
    import jax
    import torch
    import transformers

    from prefix_jax import configs, models, prefix
    from prefix_jax.serving import decoding
    from prefix_jax.tasks import e2e

    try:
        batch_sizes = [int(b) for b in _BATCH_SIZES.value]
    except ValueError:
        cli.fail(f"--batch_sizes={','.join(_BATCH_SIZES.value)} must be integers, e.g. 1,16")
    if _TORCH_THREADS.value:
        torch.set_num_threads(_TORCH_THREADS.value)

    base = models.load(configs.model_config("smollm2"))
    path = models.smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    kv = load_prefix(base)
    n_prefix = kv.k.shape[2]
    sources, _ = e2e.group_references(e2e.read_pairs(configs.default_data_dir("e2e"), "dev"))
    n = _MAX_NEW_TOKENS.value
    settings = decoding.DecodeSettings(max_new_tokens=n, pad_id=models.pad_id(base.tokenizer),
                                       prefix=prefix.DecodeOptions(position_offset=n_prefix))
    print(f"SmolLM2-135M float32, prefix {n_prefix} slots, greedy {n} new tokens, "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print("| batch | prefix_jax tok/s | transformers generate tok/s | ratio | transformers forward "
          "loop tok/s | ratio | rows with prefix_jax's tokens (generate, loop) |")
    print("|---|---|---|---|---|---|---|")
    for b in batch_sizes:
        ids = base.tokenizer([e2e.format_source(s) for s in sources[:b]],
                             add_special_tokens=False).input_ids
        bench_batch(base, hf, kv, ids, settings, _ROUNDS.value)


def bench_batch(base, hf, kv: KV, ids: list[list[int]], settings: decoding.DecodeSettings,
                rounds: int) -> None:
    """One table row: the three decoders on one batch, alternating, median of `rounds`."""
    import jax
    import jax.numpy as jnp

    from prefix_jax.serving import decoding

    b, n = len(ids), settings.max_new_tokens
    tokens, valid = decoding.left_pad(ids, settings.pad_id)

    def run_jax():
        out = decoding.decode(base.module, base.params, kv, jnp.asarray(tokens),
                              jnp.asarray(valid), settings)
        return np.asarray(jax.block_until_ready(out.tokens))

    def run_generate():
        return hf_generate(hf, kv, tokens, valid, n, settings.pad_id)

    def run_loop():
        return hf_forward_loop(hf, kv, tokens, valid, n)

    runs = {"jax": run_jax, "generate": run_generate, "loop": run_loop}
    # warm-up (and the jit compile) outside the timing; the tokens must agree
    outputs = {name: fn() for name, fn in runs.items()}
    same = {name: int((outputs["jax"] == outputs[name]).all(axis=1).sum())
            for name in ("generate", "loop")}
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tps = {name: b * n / statistics.median(t) for name, t in times.items()}
    print(f"| {b} | {tps['jax']:.1f} | {tps['generate']:.1f} | "
          f"{tps['jax'] / tps['generate']:.2f}x | {tps['loop']:.1f} | "
          f"{tps['jax'] / tps['loop']:.2f}x | {same['generate']}/{b}, {same['loop']}/{b} |",
          flush=True)


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
