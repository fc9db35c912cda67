"""`config.evals`: which evaluators a run has, as data (in the spirit of big_vision's
`config.evals`). Each entry is `name -> {type, ...}`:

  type            'generation' (decode + BLEU/ROUGE-L or the task's report metrics),
                  'loss' (teacher-forced loss and perplexity), 'accuracy' (classifiers)
  phase           'train': before training on the untuned base (once per workdir, when
                  eval.eval_untuned), every train.eval_every steps and at the end; scores are
                  logged as eval/<metric> (and eval_untuned/<metric>).
                  'end': once after training; scores logged as <name>/<metric>, the record
                  written to eval_<name>.json.
  split           'dev' or 'test' (default: dev in phase 'train', test in phase 'end')
  limit           first N sources only, 0 = all (default: eval.num_examples in 'train', 0 in 'end')
  metrics         generation: 'quick' (BLEU, ROUGE-L), 'report' (the task's reportable set,
                  E2E: the challenge's five), or metric names from GENERATION_METRICS as a
                  tuple or a comma-separated string, e.g. 'bleu,exact_match'
  num_beams, batch_size, max_new_tokens, length_penalty, num_samples: as in config.eval
                  (in phase 'end': eval.test_num_beams, eval.test_batch_size)

A config without `evals` (every config written before it existed, e.g. a workdir's config.json)
gets the evaluators `config.eval` has always meant; `specs` is the one place that translates.
"""

from __future__ import annotations

import ml_collections

from prefix_jax.errors import UserError
from prefix_jax.tasks.base import Evaluator, Task

TYPES = ("generation", "loss", "accuracy")
# metrics a generation evaluator can be asked for by name (tasks/metrics.py computes them)
GENERATION_METRICS = ("bleu", "rouge_l", "exact_match")
PHASES = ("train", "end")
_FIELDS = ("type", "phase", "split", "limit", "metrics", "num_beams", "batch_size",
           "max_new_tokens", "length_penalty", "num_samples")


def default_dev_type(task: Task) -> str:
    return "accuracy" if task.model_kind == "encoder" else "generation"


def specs(config: ml_collections.ConfigDict, task: Task) -> dict[str, ml_collections.ConfigDict]:
    """name -> complete spec, from `config.evals` or, where it is absent, from `config.eval`."""
    e = config.eval
    given = config.get("evals")
    if given is None:  # the meaning of config.eval before evals existed
        given = {}
        if e.num_examples:
            given["dev"] = {"type": default_dev_type(task)}
        if e.test_at_end:
            given["test"] = {"type": "generation", "phase": "end", "metrics": "report"}
    out = {}
    for name, spec in dict(given).items():
        spec = dict(spec)
        unknown = sorted(set(spec) - set(_FIELDS))
        if unknown:
            raise UserError(f"evals.{name} has unknown field(s) {unknown}; the fields are "
                            f"{_FIELDS}")
        if spec.get("type") not in TYPES:
            raise UserError(f"evals.{name}.type={spec.get('type')!r} must be one of {TYPES}")
        phase = spec.get("phase", "train")
        if phase not in PHASES:
            raise UserError(f"evals.{name}.phase={phase!r} must be one of {PHASES}")
        at_end = phase == "end"
        full = dict(phase=phase, split="test" if at_end else "dev",
                    limit=0 if at_end else e.num_examples,
                    metrics="report" if at_end else "quick",
                    num_beams=e.test_num_beams if at_end else e.num_beams,
                    batch_size=e.test_batch_size if at_end else e.batch_size,
                    max_new_tokens=e.max_new_tokens, length_penalty=e.length_penalty,
                    num_samples=e.num_samples)
        full.update(spec)
        if full["split"] not in ("dev", "test"):
            raise UserError(f"evals.{name}.split={full['split']!r} must be 'dev' or 'test'")
        full["metrics"] = _metrics(name, full["metrics"])
        for field in ("limit", "num_beams", "batch_size", "max_new_tokens", "num_samples"):
            value = full[field]
            if not isinstance(value, int) or isinstance(value, bool) or value < (
                    0 if field in ("limit", "num_samples") else 1):
                raise UserError(f"evals.{name}.{field}={value!r} must be an integer "
                                f"{'>= 0' if field in ('limit', 'num_samples') else '> 0'}")
        out[name] = ml_collections.ConfigDict(full)
    return out


def _metrics(name: str, given) -> str | tuple[str, ...]:
    """'quick', 'report', or a tuple of named metrics (from a tuple or 'bleu,exact_match')."""
    if given in ("quick", "report"):
        return given
    names = given.split(",") if isinstance(given, str) else given
    if not isinstance(names, (list, tuple)):
        names = None
    else:
        names = tuple(n.strip() if isinstance(n, str) else n for n in names)
    if not names or any(n not in GENERATION_METRICS for n in names) or len(set(names)) < len(
            names):
        raise UserError(f"evals.{name}.metrics={given!r} must be 'quick', 'report' or distinct "
                        f"metric names from {GENERATION_METRICS} (e.g. 'bleu,exact_match')")
    return names


def build(config: ml_collections.ConfigDict, task: Task
          ) -> tuple[dict[str, Evaluator], dict[str, Evaluator]]:
    """(the 'train'-phase evaluators, the 'end'-phase ones), by name; their files are read now.
    Two 'train'-phase evaluators reporting the same metric would overwrite each other's
    eval/<metric>: that is an error here, not a silent loss."""
    during, at_end = {}, {}
    seen: dict[str, str] = {}
    for name, spec in specs(config, task).items():
        evaluator = task.evaluator(name, spec)
        if spec.phase == "end":
            at_end[name] = evaluator
            continue
        for metric in evaluator.metric_names:
            if metric in seen:
                raise UserError(f"evals.{name} and evals.{seen[metric]} both report "
                                f"eval/{metric}; give one of them phase='end' or drop it")
            seen[metric] = name
        during[name] = evaluator
    return during, at_end
