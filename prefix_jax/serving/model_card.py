"""The README.md model card of an exported PEFT adapter: base, task, data, metrics and config of
the run it came from, and how to load it (written by `python -m prefix_jax.export`)."""

from __future__ import annotations

import json
import os

import ml_collections

# The config sections that say how the prefix was trained (the whole config.json is in the run).
_CONFIG_SECTIONS = ("prefix", "optim", "train", "trainable", "seed")


def _train_examples(config: ml_collections.ConfigDict) -> str:
    n = config.data.get("train_examples", 0)
    return "all" if not n else f"the first {n} (shuffled, data.subsample_seed=" \
        f"{config.data.get('subsample_seed', 0)})"


def _metrics(results: dict | None) -> list[str]:
    if results is None:
        return ["The run has no results.json (it had not finished its final evaluation)."]
    rows = ["| metric | value |", "|---|---:|"]
    for name, value in sorted(results.items()):
        if not isinstance(value, int | float):  # e.g. results_identity, a digest
            continue
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append(f"| {name} | {shown} |")
    return rows


def _loading(base_name: str) -> str:
    if base_name.endswith(".gguf"):
        base = f'AutoModelForCausalLM.from_pretrained(DIR_WITH_GGUF, gguf_file="{base_name}")'
    else:
        base = f'AutoModelForCausalLM.from_pretrained("{base_name}")'
    return "\n".join([
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = {base}",
        "model = PeftModel.from_pretrained(base, ADAPTER_DIR)  # this directory",
        "```",
    ])


def render(config: ml_collections.ConfigDict, results: dict | None, *, base_name: str,
           base_path: str, workdir: str, step: int, task_index: int, data_dir: str,
           n_virtual_tokens: int, n_layers: int) -> str:
    """The model card's markdown text."""
    task = config.data.task
    sections = {k: (config[k].to_dict() if isinstance(config[k], ml_collections.ConfigDict)
                    else config[k]) for k in _CONFIG_SECTIONS if k in config}
    task_line = task if task_index == 0 else f"{task} (task {task_index} of a multi-task run)"
    lines = [
        "---",
        f"base_model: {base_name}",
        "library_name: peft",
        "tags: [prefix-tuning, prefix_jax]",
        "---",
        "",
        f"# Prefix-tuning adapter: {task} on {base_name}",
        "",
        f"A PEFT prefix-tuning adapter ({n_virtual_tokens} virtual tokens x {n_layers} layers) "
        f"exported by prefix_jax from step {step} of the run `{os.path.basename(workdir)}`.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base_name}` (resolved at training: `{base_path}`) |",
        f"| task | {task_line} |",
        f"| data | `{os.path.basename(os.path.normpath(data_dir))}`; training examples: "
        f"{_train_examples(config)} |",
        f"| prefix | mode `{config.prefix.mode}`, length {config.prefix.length}, positions "
        f"`{config.prefix.positions}` (real tokens from position P, as PEFT numbers them) |",
        f"| training | {config.train.num_steps} steps of batch {config.train.batch_size}, "
        f"peak lr {config.optim.lr} |",
        "",
        "## Metrics (the run's results.json)",
        "",
        *_metrics(results),
        "",
        "## Use",
        "",
        _loading(base_name),
        "",
        "The base must hold the weights the prefix was trained on. `PeftModel.generate` ignores "
        "prefix-tuning adapters (peft 0.21, transformers 5): decode through `model(...)` "
        "(`forward`), which puts the prefix in front as a cache.",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(sections, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)
