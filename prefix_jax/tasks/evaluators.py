"""Evaluators of text-to-text tasks, one per `config.evals` type (see tasks/evals.py):

- `DevGeneration` (type 'generation', phase 'train'): decode the first `limit` sources of every
  task dir, score BLEU/ROUGE-L (or the task's report set, or the metrics the spec names), write
  `generations/<name>_<tag>.jsonl`, print a few samples. Cheap enough to run during training.
- `ReportGeneration` (type 'generation', phase 'end'): the run's own split with the task's
  reportable metrics (or the metrics the spec names), into `predictions_<name>.txt`,
  `generations/<name>.jsonl`, `eval_<name>.json` (serving/evaluation.py writes them). The
  evaluate tool uses it too.
- `TeacherForcedLoss` (type 'loss'): mean next-token loss and perplexity of the references.
"""

from __future__ import annotations

import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from prefix_jax import prefix
from prefix_jax.data import pipeline
from prefix_jax.serving import decoding, evaluation
from prefix_jax.tasks import metrics, text_to_text
from prefix_jax.tasks.base import EvalContext, Model
from prefix_jax.training import workdir as workdir_io

QUICK_METRICS = ("bleu", "rouge_l")
_LABELS = {"bleu": "BLEU", "rouge_l": "ROUGE-L", "exact_match": "EM"}


def _settings(tokenizer, spec, options: prefix.DecodeOptions) -> decoding.DecodeSettings:
    return decoding.settings_for(tokenizer, spec.max_new_tokens, prefix=options,
                                 num_beams=spec.num_beams, length_penalty=spec.length_penalty)


def _scoring(task: text_to_text.TextToTextTask, chosen):
    """(metric names, scores(predictions, references)) of a spec's `metrics`: 'quick',
    'report' (the task's own set; checked now, not after hours of decoding) or named ones."""
    if chosen == "report":
        task.check_can_report()
        return task.report_metric_names, task.report_scores
    names = QUICK_METRICS if chosen == "quick" else tuple(chosen)
    return names, functools.partial(metrics.scores, names)


def decode_batch_size(spec, name: str, n_examples: int) -> int:
    """The spec's batch size, clamped to the number of examples: `decoding.generate` pads every
    batch to full size, so a batch far above the examples would decode (and hold in memory) rows
    of nothing but padding. Rows are decoded independently: the generations are those of the
    full batch (up to float rounding of another batch shape)."""
    if spec.batch_size <= n_examples:
        return spec.batch_size
    print(f"note: evals.{name}: batch_size={spec.batch_size} is more than its {n_examples} "
          f"examples; decoding them as one batch of {max(n_examples, 1)}", file=sys.stderr)
    return max(n_examples, 1)


def _prefix_of(model: Model, params: dict, task: int, ctx: EvalContext):
    """Task `task`'s prefix and the options to decode it with (none for the untuned base)."""
    if not ctx.with_prefix:
        return None, prefix.DecodeOptions()
    return prefix.select(model.prefix_kv(params), jnp.asarray([task])), model.options


class DevGeneration:
    def __init__(self, task: text_to_text.TextToTextTask, name: str, spec):
        self.task, self.name, self.spec = task, name, spec
        names, self._score = _scoring(task, spec.metrics)
        n = spec.limit
        self.sets = []
        for data_dir in task.dirs:
            sources, refs = task.read_references(data_dir, spec.split)
            self.sets.append((sources[:n] if n else sources, refs[:n] if n else refs))
        self.metric_names = tuple(k if t == 0 else f"task{t}_{k}"
                                  for t in range(len(self.sets)) for k in names)
        how = "greedy" if spec.num_beams == 1 else f"beam {spec.num_beams}"
        self.batch_size = decode_batch_size(spec, name, max(len(s) for s, _ in self.sets))
        self.description = f"{len(self.sets[0][0])} {task.unit}, {how}"

    def __call__(self, model: Model, params: dict, tokenizer, ctx: EvalContext
                 ) -> dict[str, float]:
        tag = f"step{ctx.step}" if ctx.with_prefix else "untuned"
        results = {}
        for task, (sources, refs) in enumerate(self.sets):
            if not sources:
                continue
            started = time.perf_counter()
            title = f"{self.name}_{tag}" if task == 0 else f"{self.name}_{tag}_task{task}"
            kv, options = _prefix_of(model, params, task, ctx)
            predictions = decoding.generate(
                model.base, params["base"], kv, tokenizer,
                [self.task.prompt(s) for s in sources], self.batch_size,
                _settings(tokenizer, self.spec, options))
            if ctx.is_main and ctx.workdir is not None:  # before scoring: decoding is the cost
                _save_generations(ctx.workdir, title, sources, refs, predictions)
            scores = self._score(predictions, refs)
            if ctx.is_main:
                _print_samples(title, scores, sources, predictions, self.spec.num_samples,
                               self.task.unit)
            ctx.say(f"  ({len(sources)} {self.task.unit} decoded in "
                    f"{time.perf_counter() - started:.0f} s)")
            results.update({(k if task == 0 else f"task{task}_{k}"): v
                            for k, v in scores.items()})
        return results


def _save_generations(workdir: str, name: str, sources, references, predictions) -> None:
    workdir_io.write_jsonl(workdir, f"generations/{name}.jsonl", [
        {"source": s, "prediction": p, "references": r}
        for s, r, p in zip(sources, references, predictions)])


def _print_samples(title: str, scores: dict, sources, predictions, n: int, unit: str) -> None:
    line = "  ".join(f"{_LABELS.get(k, k)} {v:.1f}" for k, v in scores.items())
    print(f"\n== {title}: {line} on {len(sources)} dev {unit} ==")
    for s, p in list(zip(sources, predictions))[:n]:
        print(f"  MR:   {s}\n  GEN:  {p}")


class ReportGeneration:
    """The whole split (or its first `limit` sources) of the run's own task dir, beam search."""

    def __init__(self, task: text_to_text.TextToTextTask, name: str, spec,
                 data_dir: str | None = None):
        self.task, self.name, self.spec = task, name, spec
        self.metric_names, self._score = _scoring(task, spec.metrics)
        self.data_dir = data_dir or task.dirs[0]
        sources, references = task.read_references(self.data_dir, spec.split)
        if spec.limit:
            sources, references = sources[:spec.limit], references[:spec.limit]
        self.sources, self.references = sources, references
        self.batch_size = decode_batch_size(spec, name, len(sources))
        self.description = f"{len(sources)} {task.unit}, beam {spec.num_beams}"

    def run(self, module, base_params: dict, kv, options: prefix.DecodeOptions, tokenizer,
            workdir: str | None, extra: dict) -> dict:
        """Decode and score; the whole record (scores + how they were made), also written into
        `workdir` unless it is None."""
        return evaluation.evaluate_split(
            module, base_params, kv, tokenizer, workdir, self.name, self.task.name,
            self.spec.split, self.sources, self.references,
            [self.task.prompt(s) for s in self.sources],
            self._score, _settings(tokenizer, self.spec, options),
            self.batch_size, extra)

    def __call__(self, model: Model, params: dict, tokenizer, ctx: EvalContext
                 ) -> dict[str, float]:
        kv, options = _prefix_of(model, params, 0, ctx)
        started = time.perf_counter()
        result = self.run(model.base, params["base"], kv, options, tokenizer,
                          ctx.workdir if ctx.is_main else None, {"step": ctx.step})
        scores = result["scores"]
        ctx.say(f"\n== {self.name} ({result['num_examples']} {self.task.unit}, beam "
                f"{self.spec.num_beams}): " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
                + f" ({time.perf_counter() - started:.0f} s) ==")
        return scores


class TeacherForcedLoss:
    """Mean cross-entropy of every reference given its source (all references of the first
    `limit` sources), and its perplexity: comparable across decoders and prefix variants."""

    metric_names = ("loss", "perplexity")

    def __init__(self, task: text_to_text.TextToTextTask, name: str, spec):
        self.task, self.name, self.spec = task, name, spec
        pairs = task.read_pairs(task.dirs[0], spec.split)
        if spec.limit:
            keep = set(list(dict.fromkeys(p.source for p in pairs))[:spec.limit])
            pairs = [p for p in pairs if p.source in keep]
        self.pairs = pairs
        self.where = f"{task.dirs[0]} ({spec.split})"
        self.description = f"{len(pairs)} references, teacher-forced"
        self._jitted = {}  # (model, with_prefix) -> jitted loss sum, compiled once per width

    def __call__(self, model: Model, params: dict, tokenizer, ctx: EvalContext
                 ) -> dict[str, float]:
        from prefix_jax import models

        key = (model, ctx.with_prefix)
        if key not in self._jitted:
            self._jitted[key] = jax.jit(functools.partial(
                text_to_text.target_loss_sum, model, with_prefix=ctx.with_prefix))
        loss_sum = self._jitted[key]
        config = self.task.config
        examples = text_to_text.tokenize_pairs(self.pairs, tokenizer, config.data.max_len,
                                               self.where, prompt=self.task.prompt)
        order = np.argsort([len(e.tokens) for e in examples], kind="stable")  # less padding
        total, count = 0.0, 0.0
        for start in range(0, len(order), self.spec.batch_size):
            rows = [examples[i] for i in order[start:start + self.spec.batch_size]]
            batch = pipeline.collate(rows, config.data.bucket_multiple,
                                     models.pad_id(tokenizer))
            s, c = loss_sum(params, {k: jnp.asarray(v) for k, v in batch.items()})
            total, count = total + float(s), count + float(c)
        loss = total / max(count, 1.0)
        scores = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        ctx.say(f"\n== {self.name}{'' if ctx.with_prefix else ' (untuned)'}: loss "
                f"{loss:.4f}  perplexity {scores['perplexity']:.2f} on {len(examples)} "
                "references ==")
        return scores
