r"""Evaluate a trained prefix on a whole split, with the task's reportable metrics.

  python -m prefix_jax.evaluate --workdir=runs/e2e_smollm2 --split=test            # beam 5
  python -m prefix_jax.evaluate --workdir=runs/e2e_smollm2 --split=dev --num_beams=1
  python -m prefix_jax.evaluate --workdir=runs/e2e_smollm2 --split=test --task=dart

E2E: BLEU, NIST, METEOR, ROUGE-L, CIDEr against every reference of each MR (README: where each
metric comes from). DART: BLEU. Writes `predictions_<split>.txt` and `generations/<split>.jsonl`
as soon as decoding ends, then `eval_<split>.json`, into the workdir (`dart_<split>` names for
DART on an E2E run). An `eval_<split>.json` made with other settings (decoding, --limit,
checkpoint step, data) is not replaced without --overwrite; METEOR's Java is checked before
decoding.
"""

from __future__ import annotations

import json
import os

from absl import flags

from prefix_jax import cli

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.", flag_values=FLAGS)
_SPLIT = flags.DEFINE_enum("split", None, ["dev", "test"], "The split to evaluate.",
                           flag_values=FLAGS)
_TASK = flags.DEFINE_enum("task", None, ["e2e", "dart"],
                          "Default: the run's own task (its config.json).", flag_values=FLAGS)
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Default: the run's data.dir, or ../shared/data/<task>.",
                                flag_values=FLAGS)
cli.define_decoding_flags(FLAGS, num_beams=5, batch_size=10)
_LIMIT = flags.DEFINE_integer("limit", 0, "First N sources only; 0 = all.", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an earlier eval_<split>.json made "
                               "with other settings (default: refuse).", flag_values=FLAGS)


def main() -> None:
    if not _WORKDIR.value or not _SPLIT.value:
        cli.fail("--workdir and --split (dev or test) are required")
    cli.check_decoding_flags(FLAGS)
    if _LIMIT.value < 0:
        cli.fail(f"--limit={_LIMIT.value} must be >= 0 (0 = all)")
    if not os.path.isdir(_WORKDIR.value):
        cli.fail(f"--workdir={_WORKDIR.value} is not a directory; give a training run's workdir")

    from prefix_jax.tasks import report

    result = report.evaluate_workdir(
        _WORKDIR.value, _SPLIT.value, _TASK.value, _DATA_DIR.value, FLAGS.num_beams,
        FLAGS.length_penalty, FLAGS.max_new_tokens, FLAGS.batch_size, _LIMIT.value,
        _OVERWRITE.value)
    print(json.dumps(result, indent=2))


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
