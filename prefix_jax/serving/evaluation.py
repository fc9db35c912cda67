"""Reportable evaluation of a trained prefix: decode a whole split, score it with the task's
metrics (E2E: BLEU, NIST, METEOR, ROUGE-L, CIDEr against every reference of each MR; DART:
BLEU), and write the predictions and `eval_<split>.json` into the workdir.

`scripts/evaluate.py` is the command line; training calls `evaluate_split` for the test set at
the end when `eval.test_at_end` is set.
"""

from __future__ import annotations

import json
import os
import time

from prefix_jax import configs
from prefix_jax.errors import UserError
from prefix_jax.models.backbone import Backbone
from prefix_jax.models.core import KV
from prefix_jax.serving import bank, decoding
from prefix_jax.tasks import dart, e2e, metrics

TASKS = ("e2e", "dart")


def read_split(task: str, data_dir: str, split: str) -> tuple[list[str], list[list[str]]]:
    """Unique sources of a split, in file order, with all references of each."""
    if task == "e2e":
        return e2e.group_references(e2e.read_pairs(data_dir, split))
    if task == "dart":
        return dart.read_split(data_dir, split)
    raise UserError(f"task {task!r} is not one of {TASKS}")


def score(task: str, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    if task == "e2e":
        return metrics.e2e_scores(predictions, references)
    return {"bleu": metrics.corpus_bleu(predictions, references)}


def output_name(task: str, run_task: str, split: str) -> str:
    """`test` for the run's own task, `dart_test` for another: files never collide."""
    return split if task == run_task else f"{task}_{split}"


def check_can_score(task: str) -> None:
    """E2E's METEOR runs Java: say so before hours of decoding, not after."""
    import shutil

    if task == "e2e" and shutil.which("java") is None:
        raise UserError("E2E evaluation needs Java on the PATH for METEOR 1.5 (pycocoevalcap); "
                        "install a JRE, e.g. apt-get install default-jre-headless")


def evaluate_split(module: Backbone, params: dict, prefix: KV | None, tokenizer,
                   workdir: str | None,
                   task: str, run_task: str, data_dir: str, split: str,
                   settings: decoding.DecodeSettings, batch_size: int, limit: int = 0,
                   extra: dict | None = None) -> dict:
    """Decode and score one split; write `predictions_<name>.txt`, `generations/<name>.jsonl`
    and `eval_<name>.json` (scores + how they were made) into `workdir` (None: write nothing),
    only after success."""
    check_can_score(task)
    sources, references = read_split(task, data_dir, split)
    if limit:
        sources, references = sources[:limit], references[:limit]
    started = time.perf_counter()
    predictions = decoding.generate(module, params, prefix, tokenizer,
                                    [e2e.format_source(s) for s in sources], batch_size, settings)
    decode_seconds = time.perf_counter() - started
    scores = score(task, predictions, references)
    result = {"task": task, "split": split, "num_examples": len(sources),
              "num_references": sum(len(r) for r in references), "scores": scores,
              "decoding": {"num_beams": settings.num_beams,
                           "length_penalty": settings.length_penalty,
                           "max_new_tokens": settings.max_new_tokens,
                           "do_sample": settings.do_sample},
              "decode_seconds": round(decode_seconds, 1), **(extra or {})}
    if workdir is None:
        return result
    name = output_name(task, run_task, split)
    with open(os.path.join(workdir, f"predictions_{name}.txt"), "w", encoding="utf-8") as f:
        f.writelines(p.replace("\n", " ") + "\n" for p in predictions)
    os.makedirs(os.path.join(workdir, "generations"), exist_ok=True)
    with open(os.path.join(workdir, "generations", f"{name}.jsonl"), "w", encoding="utf-8") as f:
        for s, r, p in zip(sources, references, predictions):
            f.write(json.dumps({"source": s, "prediction": p, "references": r}) + "\n")
    with open(os.path.join(workdir, f"eval_{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def evaluate_workdir(workdir: str, split: str, task: str | None = None,
                     data_dir: str | None = None, num_beams: int = 5,
                     length_penalty: float = 1.0, max_new_tokens: int = 64,
                     batch_size: int = 10, limit: int = 0) -> dict:
    """The newest checkpoint of a run, evaluated on `split` of its own task (or `task`)."""
    run = bank.load([workdir])
    config = run.configs[0]
    run_task = config.data.task
    task = task or run_task
    if task not in TASKS:
        raise UserError(f"--task={task} is not one of {TASKS}")
    if data_dir is None:
        data_dir = config.data.dir if task == run_task else configs.default_data_dir(task)
    tokenizer = run.base.tokenizer
    settings = decoding.settings_for(tokenizer, max_new_tokens, num_beams=num_beams,
                                     length_penalty=length_penalty, prefix=run.options)
    return evaluate_split(run.base.module, run.base.params, run.row(0), tokenizer, workdir, task,
                          run_task, data_dir, split, settings, batch_size, limit,
                          extra={"step": run.steps[0], "data_dir": data_dir})
