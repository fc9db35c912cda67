"""Decode a whole split, score it, and write the record into a workdir: the generic half of a
reportable evaluation. The task supplies its sources, references, prompts and metrics
(tasks/evaluators.py `ReportGeneration`); this module knows no task.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prefix_jax.models.backbone import Backbone
from prefix_jax.models.core import KV
from prefix_jax.serving import decoding
from prefix_jax.training import workdir as workdir_io


def evaluate_split(module: Backbone, params: dict, prefix: KV | None, tokenizer,
                   workdir: str | None,
                   name: str, task: str, split: str, sources: list[str],
                   references: list[list[str]], prompts: list[str],
                   score: Callable[[list[str], list[list[str]]], dict[str, float]],
                   settings: decoding.DecodeSettings, batch_size: int,
                   extra: dict | None = None) -> dict:
    """Decode `prompts` and score them against `references`. Into `workdir` (None: write
    nothing): `predictions_<name>.txt` and `generations/<name>.jsonl` as soon as decoding ends
    (a scorer that fails does not lose hours of decoding), then `eval_<name>.json` (scores + how
    they were made); each file atomic (training/workdir.py)."""
    started = time.perf_counter()
    predictions = decoding.generate(module, params, prefix, tokenizer, prompts, batch_size,
                                    settings, progress=f"decoding {name}")
    decode_seconds = time.perf_counter() - started
    if workdir is not None:
        workdir_io.write_text(workdir, f"predictions_{name}.txt",
                              "".join(" ".join(p.splitlines()) + "\n" for p in predictions))
        workdir_io.write_jsonl(workdir, f"generations/{name}.jsonl", [
            {"source": s, "prediction": p, "references": r}
            for s, r, p in zip(sources, references, predictions)])
    scores = score(predictions, references)
    result = {"task": task, "split": split, "num_examples": len(sources),
              "num_references": sum(len(r) for r in references), "scores": scores,
              "decoding": decoding_record(settings),
              "decode_seconds": round(decode_seconds, 1), **(extra or {})}
    if workdir is not None:
        workdir_io.write_json(workdir, f"eval_{name}.json", result)
    return result


def decoding_record(settings: decoding.DecodeSettings) -> dict:
    """How a split was decoded, as `eval_<name>.json` records it (and the evaluate tool compares
    before writing over an earlier result)."""
    return {"num_beams": settings.num_beams, "length_penalty": settings.length_penalty,
            "max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample}
