"""Decode a whole split, score it, and write the record into a workdir: the generic half of a
reportable evaluation. The task supplies its sources, references, prompts and metrics
(tasks/evaluators.py `ReportGeneration`); this module knows no task.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from prefix_jax.models.backbone import Backbone
from prefix_jax.models.core import KV
from prefix_jax.serving import decoding


def evaluate_split(module: Backbone, params: dict, prefix: KV | None, tokenizer,
                   workdir: str | None,
                   name: str, task: str, split: str, sources: list[str],
                   references: list[list[str]], prompts: list[str],
                   score: Callable[[list[str], list[list[str]]], dict[str, float]],
                   settings: decoding.DecodeSettings, batch_size: int,
                   extra: dict | None = None) -> dict:
    """Decode `prompts` and score them against `references`; write `predictions_<name>.txt`,
    `generations/<name>.jsonl` and `eval_<name>.json` (scores + how they were made) into
    `workdir` (None: write nothing), only after success."""
    started = time.perf_counter()
    predictions = decoding.generate(module, params, prefix, tokenizer, prompts, batch_size,
                                    settings)
    decode_seconds = time.perf_counter() - started
    scores = score(predictions, references)
    result = {"task": task, "split": split, "num_examples": len(sources),
              "num_references": sum(len(r) for r in references), "scores": scores,
              "decoding": {"num_beams": settings.num_beams,
                           "length_penalty": settings.length_penalty,
                           "max_new_tokens": settings.max_new_tokens,
                           "do_sample": settings.do_sample},
              "decode_seconds": round(decode_seconds, 1), **(extra or {})}
    if workdir is None:
        return result
    with open(os.path.join(workdir, f"predictions_{name}.txt"), "w", encoding="utf-8") as f:
        f.writelines(" ".join(p.splitlines()) + "\n" for p in predictions)
    os.makedirs(os.path.join(workdir, "generations"), exist_ok=True)
    with open(os.path.join(workdir, "generations", f"{name}.jsonl"), "w", encoding="utf-8") as f:
        for s, r, p in zip(sources, references, predictions):
            f.write(json.dumps({"source": s, "prediction": p, "references": r}) + "\n")
    with open(os.path.join(workdir, f"eval_{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
