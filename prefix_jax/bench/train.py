r"""prefix_jax vs PEFT prefix tuning on the same SmolLM2 weights, side by side in one run.

  python -m prefix_jax.bench.train [--rounds=3] [--threads=2] [--out=bench.json]

Both systems train the same prefix (P=10, positions after the prefix as PEFT has them, AdamW)
on the same SmolLM2-135M weights (prefix_jax's GGUF load, copied into transformers'
LlamaForCausalLM), with the same number of threads, in alternating rounds so that a noisy
machine slows both alike. Before timing, one batch's loss is compared (the same function must
be computed). Workloads:
- fixed: batch 4 x 128 tokens, every position a target (full causal-LM loss in both);
- e2e: real E2E training batches of 8; prefix_jax reads its own (length-bucketed, the loss only
  at target positions); PEFT gets batches as an HF Trainer makes them by default (shuffled,
  each padded to its longest row, source/padding labels -100, as the HF collators do), and,
  for a second ratio, prefix_jax's very batches padded the same way; useful = non-padding
  tokens;
- fine-tune: prefix_jax prefix tuning vs full fine-tuning on the fixed batch.
Arithmetic floor: XLA's FLOP count of the prefix_jax step divided by the best float32 matmul
rate measured in this run. Peak memory: peak RSS of a fresh process per system (load, 3 steps).
Prints a table of ratios last; --out writes them as JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import flags

from prefix_jax import bench, cli

FLAGS = cli.flag_values()
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (the median is reported).",
                               flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 3, "Fixed-workload steps per round.", flag_values=FLAGS)
_THREADS = flags.DEFINE_integer("threads", os.cpu_count(), "Threads of both systems.",
                                flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", "", "JSON file for the results.", flag_values=FLAGS)
_MODEL = flags.DEFINE_string("model", "smollm2", "model.path (tiny: a smoke run).",
                             flag_values=FLAGS)
_CONFIG = flags.DEFINE_string("config", bench.MAIN_EXPERIMENT, "The experiment FILE[:ARG] whose "
                              "config the prefix_jax side trains with.", flag_values=FLAGS)
_PROBE = flags.DEFINE_enum("probe", None, ["jax", "torch"], "Internal: the child process that "
                           "measures one system's peak memory.", flag_values=FLAGS)

PREFIX_LEN = 10
FIXED_BATCH, FIXED_LEN = 4, 128
E2E_BATCH, E2E_BATCHES = 8, 8
LR = 1e-2


# ---- Batches -------------------------------------------------------------------------------

def fixed_batch(vocab: int) -> dict[str, np.ndarray]:
    """prefix_jax's batch layout for B x T random tokens, every next token a target."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (FIXED_BATCH, FIXED_LEN), dtype=np.int32)
    n = FIXED_LEN - 1
    return {"tokens": tokens,
            "positions": np.tile(np.arange(FIXED_LEN, dtype=np.int32), (FIXED_BATCH, 1)),
            "segment_ids": np.ones((FIXED_BATCH, FIXED_LEN), np.int32),
            "target_index": np.tile(np.arange(n, dtype=np.int32), (FIXED_BATCH, 1)),
            "target_tokens": tokens[:, 1:].copy(),
            "target_weight": np.ones((FIXED_BATCH, n), np.float32)}


def e2e_batches(config, tokenizer, pad: int) -> tuple[list[tuple[dict, list]], list[list]]:
    """The first E2E_BATCHES training batches of prefix_jax (its batch, the rows' Tokenized),
    and as many batches as an HF Trainer makes them by default (shuffled, no length grouping)."""
    from prefix_jax.data import pipeline
    from prefix_jax.tasks import e2e, text_to_text

    pairs = e2e.read_pairs(config.data.dir, "train")
    examples = text_to_text.tokenize_pairs(pairs, tokenizer, config.data.max_len, "trainset.csv")
    plan = pipeline.BatchPlan(np.asarray([len(e.tokens) for e in examples]), E2E_BATCH,
                              config.seed)
    out = []
    for i in range(E2E_BATCHES):
        rows = [examples[j] for j in plan(i)]
        widths = pipeline.padded_lengths(rows, config.data.bucket_multiple)
        out.append((pipeline.collate(rows, config.data.bucket_multiple, pad, widths), rows))
    order = np.random.default_rng(config.seed).permutation(len(examples))
    shuffled = [[examples[j] for j in order[i * E2E_BATCH:(i + 1) * E2E_BATCH]]
                for i in range(E2E_BATCHES)]
    return out, shuffled


def hf_batch(rows, pad: int) -> dict:
    """HF-collator style: right-padded to the longest row, labels -100 on source and padding."""
    import torch

    t = max(len(r.tokens) for r in rows)
    ids = np.full((len(rows), t), pad, np.int64)
    labels = np.full((len(rows), t), -100, np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r.tokens)] = r.tokens
        labels[i, r.n_source:len(r.tokens)] = r.tokens[r.n_source:]
        mask[i, :len(r.tokens)] = 1
    return {k: torch.from_numpy(v) for k, v in
            (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}


def hf_fixed_batch(batch: dict) -> dict:
    import torch

    ids = torch.from_numpy(batch["tokens"].astype(np.int64))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# ---- The two systems -----------------------------------------------------------------------

def jax_config(spec: str, model: str, trainable: str = r"^prefix/"):
    """The main job's config (its runlocal variant for the tiny models) with bench settings."""
    config = bench.experiment_config(spec, model)
    if model.startswith("tiny"):
        config.data.max_len = 512  # every E2E pair fits the byte-level tokenizer's lengths
    config.prefix.length = PREFIX_LEN
    config.prefix.init = "random"
    config.prefix.init_std = 0.02
    config.prefix.positions = "after_prefix"  # as PEFT: real tokens start at position P
    config.trainable = trainable
    config.optim.lr = LR
    config.optim.grad_clip_norm = 0.0  # PEFT's loop below does not clip either
    config.mesh.data = 1
    return config


class JaxSystem:
    """The train step exactly as train.py builds it (mesh, shardings, donation)."""

    def __init__(self, loaded, config):
        import jax

        from prefix_jax import train
        from prefix_jax.tasks import text_to_text
        from prefix_jax.training import sharding

        mesh = sharding.make_mesh(config.mesh)
        loaded = train.place_base(loaded, mesh, sharding.parse_rules(config.mesh.rules))
        self.setup = train.create_train_state(config, loaded, mesh)
        self.state = self.setup.state
        self.step_fn = jax.jit(functools.partial(train.train_step, model=self.setup.model,
                                                 tx=self.setup.tx,
                                                 loss_fn=text_to_text.lm_loss),
                               donate_argnums=(0,),
                               out_shardings=(self.setup.state_shardings,
                                              sharding.replicated(mesh)))
        self._jax = jax

    def step(self, batch) -> float:
        self.state, metrics = self.step_fn(self.state, self.setup.frozen, batch)
        return metrics["train/loss"]

    def run(self, batches) -> None:
        loss = None
        for b in batches:
            loss = self.step(b)
        self._jax.block_until_ready(loss)

    def flops(self, batch) -> float:
        """XLA's FLOP count of one step (the layer scan unrolled: XLA counts a loop body once)."""
        import jax

        from prefix_jax import train
        from prefix_jax.tasks import text_to_text

        model = dataclasses.replace(self.setup.model, base=self.setup.model.base.clone(
            unroll=self.setup.model.base.config.n_layers))
        step = jax.jit(functools.partial(train.train_step, model=model, tx=self.setup.tx,
                                         loss_fn=text_to_text.lm_loss))
        cost = step.lower(self.state, self.setup.frozen, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"])

    def loss(self, batch) -> float:
        from prefix_jax.tasks import text_to_text

        return float(text_to_text.lm_loss(self.state.trainable, self.setup.frozen, batch,
                                   self.setup.model))

    def prefix(self) -> tuple[np.ndarray, np.ndarray]:
        p = self.state.trainable["prefix"]
        return np.asarray(p["key"]), np.asarray(p["value"])


class PeftSystem:
    """transformers LlamaForCausalLM with the same weights + peft PrefixTuningConfig + AdamW."""

    def __init__(self, loaded, prefix_kv: tuple[np.ndarray, np.ndarray]):
        import peft
        import torch
        import transformers

        from prefix_jax.models.hf_llama import config_to_hf, params_to_hf

        cfg = loaded.config
        hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg))
        with torch.device("meta"):  # no random init: the weights are assigned below
            model = transformers.LlamaForCausalLM(hf_cfg)
        hf_tensors = params_to_hf(cfg, loaded.params)  # copies: torch owns its weights
        state = {k: torch.from_numpy(np.array(v)) for k, v in hf_tensors.items()}
        if cfg.tie_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, assign=True, strict=True)
        model.tie_weights()
        model.model.rotary_emb = type(model.model.rotary_emb)(hf_cfg)  # buffers off meta
        self.model = peft.get_peft_model(model, peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_LEN))
        key, value = prefix_kv  # [L, P, K, D] each -> PEFT's [P, L * 2 * K * D] rows
        rows = np.stack([key, value], axis=1).transpose(2, 0, 1, 3, 4).reshape(PREFIX_LEN, -1)
        with torch.no_grad():
            self.model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(rows))
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        self._torch = torch

    def step(self, batch) -> float:
        loss = self.model(**batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def run(self, batches) -> None:
        for b in batches:
            self.step(b)

    def loss(self, batch) -> float:
        with self._torch.no_grad():
            return float(self.model(**batch).loss)


# ---- Measurements --------------------------------------------------------------------------

def matmul_rate(threads: int) -> dict[str, float]:
    """Best float32 GFLOP/s of a SmolLM2-sized matmul (512x576 @ 576x1536) in each framework."""
    import jax
    import jax.numpy as jnp
    import torch

    m, k, n, reps = 512, 576, 1536, 50
    flops = 2 * m * k * n * reps
    a, b = np.random.rand(m, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    f = jax.jit(lambda x, y: x @ y)
    f(ja, jb).block_until_ready()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch.set_num_threads(threads)
    best = {"jax": 0.0, "torch": 0.0}
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready([f(ja, jb) for _ in range(reps)])
        best["jax"] = max(best["jax"], flops / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(ta, tb)
        best["torch"] = max(best["torch"], flops / (time.perf_counter() - t) / 1e9)
    return best


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(rounds: int, runs: dict) -> dict[str, list[float]]:
    """Seconds of each named run per round, the runs taking turns within every round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    return times


def probe_memory(system: str, threads: int, spec: str, model: str) -> None:
    """Child process: load, 3 fixed steps, print peak RSS (MiB) as JSON."""
    from prefix_jax import models

    config = jax_config(spec, model)
    loaded = models.load(config.model)
    batch = fixed_batch(loaded.config.vocab_size)
    if system == "jax":
        runner = JaxSystem(loaded, config)
        del loaded
        runner.run([batch] * 3)
    else:
        import torch

        torch.set_num_threads(threads)
        kv = (np.zeros((loaded.config.n_layers, PREFIX_LEN, loaded.config.n_kv_heads,
                        loaded.config.head_dim), np.float32),) * 2
        runner = PeftSystem(loaded, kv)
        runner.run([hf_fixed_batch(batch)] * 3)
    # VmHWM, not getrusage's ru_maxrss: the latter keeps the parent's high-water mark over exec
    with open("/proc/self/status") as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mib": peak_kib / 1024}))


def peak_rss(system: str, threads: int, spec: str, model: str) -> float:
    out = subprocess.run([sys.executable, "-m", "prefix_jax.bench.train", f"--probe={system}",
                          f"--threads={threads}", f"--config={spec}", f"--model={model}"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> None:
    for name in ("rounds", "steps", "threads"):
        if FLAGS[name].value < 1:
            cli.fail(f"--{name}={FLAGS[name].value} must be >= 1")
    if _PROBE.value:
        return probe_memory(_PROBE.value, _THREADS.value, _CONFIG.value, _MODEL.value)

    import jax
    import torch

    from prefix_jax import models

    torch.set_num_threads(_THREADS.value)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"{_THREADS.value} threads")
    config = jax_config(_CONFIG.value, _MODEL.value)
    loaded = models.load(config.model)
    pad = models.pad_id(loaded.tokenizer)
    fixed = fixed_batch(loaded.config.vocab_size)
    fixed_tokens = FIXED_BATCH * FIXED_LEN
    ours = JaxSystem(loaded, config)
    theirs = PeftSystem(loaded, ours.prefix())

    # ---- Same function: the loss of one batch in both systems.
    hf_fixed = hf_fixed_batch(fixed)
    e2e, shuffled = e2e_batches(config, loaded.tokenizer, pad)
    loss_check = {"fixed": (ours.loss(fixed), theirs.loss(hf_fixed)),
                  "e2e": (ours.loss(e2e[0][0]), theirs.loss(hf_batch(e2e[0][1], pad)))}
    for name, (a, b) in loss_check.items():
        print(f"loss of one {name} batch: prefix_jax {a:.5f}, peft {b:.5f}")
        if abs(a - b) > 1e-3 * abs(b):
            raise SystemExit(f"error: the two systems compute different losses on the {name} "
                             "batch; the comparison would be meaningless")

    # ---- Compile every shape before timing (steady-state training speed is compared).
    ours_e2e = [b for b, _ in e2e]
    theirs_e2e = [hf_batch(rows, pad) for _, rows in e2e]
    theirs_shuffled = [hf_batch(rows, pad) for rows in shuffled]
    useful = sum(len(r.tokens) for _, rows in e2e for r in rows)
    useful_shuffled = sum(len(r.tokens) for rows in shuffled for r in rows)
    ours.run([fixed, *ours_e2e])
    theirs.run([hf_fixed, theirs_e2e[0], theirs_shuffled[0]])
    full = JaxSystem(loaded, jax_config(_CONFIG.value, _MODEL.value, trainable=r"^(base|prefix)/"))
    full.run([fixed])

    rate = matmul_rate(_THREADS.value)
    flops = ours.flops(fixed)

    times = alternate(_ROUNDS.value, {
        "prefix_jax fixed": lambda: ours.run([fixed] * _STEPS.value),
        "peft fixed": lambda: theirs.run([hf_fixed] * _STEPS.value),
        "prefix_jax full fine-tune fixed": lambda: full.run([fixed] * _STEPS.value),
        "prefix_jax e2e": lambda: ours.run(ours_e2e),
        "peft e2e": lambda: theirs.run(theirs_shuffled),
        "peft e2e same batches": lambda: theirs.run(theirs_e2e),
    })
    memory = {"prefix_jax": peak_rss("jax", _THREADS.value, _CONFIG.value, _MODEL.value),
              "peft": peak_rss("torch", _THREADS.value, _CONFIG.value, _MODEL.value)}

    # ---- Report.
    def per_round(name: str, tokens: int) -> list[float]:
        return [tokens / t for t in times[name]]

    def ratio(a: str, b: str, tokens: int, tokens_b: int | None = None) -> float:
        return statistics.median(x / y for x, y in zip(
            per_round(a, tokens), per_round(b, tokens if tokens_b is None else tokens_b)))

    fixed_tok = fixed_tokens * _STEPS.value
    step_s = statistics.median(times["prefix_jax fixed"]) / _STEPS.value
    floor_s = flops / (max(rate.values()) * 1e9)
    result = {
        "threads": _THREADS.value, "rounds": _ROUNDS.value,
        "matmul_gflops": rate, "step_gflop": flops / 1e9,
        "fixed_tokens_per_sec": {k: statistics.median(per_round(f"{k} fixed", fixed_tok))
                                 for k in ("prefix_jax", "peft")},
        "fixed_full_finetune_tokens_per_sec": statistics.median(
            per_round("prefix_jax full fine-tune fixed", fixed_tok)),
        "e2e_useful_tokens_per_sec": {
            "prefix_jax": statistics.median(per_round("prefix_jax e2e", useful)),
            "peft": statistics.median(per_round("peft e2e", useful_shuffled)),
            "peft_same_batches": statistics.median(per_round("peft e2e same batches", useful))},
        "peak_rss_mib": memory,
        "ratio_vs_peft_fixed": ratio("prefix_jax fixed", "peft fixed", fixed_tok),
        "ratio_vs_peft_e2e": ratio("prefix_jax e2e", "peft e2e", useful, useful_shuffled),
        "ratio_vs_peft_e2e_same_batches": ratio("prefix_jax e2e", "peft e2e same batches",
                                                useful),
        "ratio_prefix_vs_full_finetune": ratio("prefix_jax fixed",
                                               "prefix_jax full fine-tune fixed", fixed_tok),
        "floor_fraction": floor_s / step_s,
        "loss_check": loss_check,
    }
    print(f"\nfixed {FIXED_BATCH}x{FIXED_LEN}, P={PREFIX_LEN}: step {step_s:.3f} s, "
          f"{flops / 1e9:.0f} GFLOP (XLA), floor {floor_s:.3f} s at "
          f"{max(rate.values()):.0f} GFLOP/s (matmul: jax {rate['jax']:.0f}, torch "
          f"{rate['torch']:.0f})")
    for key in ("fixed_tokens_per_sec", "e2e_useful_tokens_per_sec", "peak_rss_mib"):
        print(f"{key}: " + ", ".join(f"{k} {v:.0f}" for k, v in result[key].items()))
    print(f"fixed_full_finetune_tokens_per_sec: {result['fixed_full_finetune_tokens_per_sec']:.0f}")
    print("\n| ratio | measured | target |\n|---|---|---|")
    rows = (("prefix_jax / peft tokens/s, fixed", result["ratio_vs_peft_fixed"], ">= 1.15"),
            ("prefix_jax / peft useful tokens/s, e2e (peft: shuffled batches, HF default)",
             result["ratio_vs_peft_e2e"], ">= 2"),
            ("prefix_jax / peft useful tokens/s, e2e (peft: prefix_jax's length-bucketed "
             "batches)", result["ratio_vs_peft_e2e_same_batches"], "-"),
            ("fraction of the arithmetic floor", result["floor_fraction"], ">= 0.85"),
            ("peak RSS prefix_jax / peft", memory["prefix_jax"] / memory["peft"], "<= 1"),
            ("prefix tuning / full fine-tuning tokens/s", result["ratio_prefix_vs_full_finetune"],
             "~1.3 (paper)"))
    for name, value, target in rows:
        print(f"| {name} | {value:.2f} | {target} |")
    if _OUT.value:
        from prefix_jax.training import workdir as workdir_io

        out = os.path.abspath(_OUT.value)
        workdir_io.write_json(os.path.dirname(out), os.path.basename(out), result)


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
