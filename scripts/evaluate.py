r"""Evaluate a trained prefix on a whole split, with the task's reportable metrics.

  python scripts/evaluate.py --workdir runs/e2e_smollm2 --split test            # beam 5
  python scripts/evaluate.py --workdir runs/e2e_smollm2 --split dev --num_beams 1
  python scripts/evaluate.py --workdir runs/e2e_smollm2 --split test --task dart

E2E: BLEU, NIST, METEOR, ROUGE-L, CIDEr against every reference of each MR (README: where each
metric comes from). DART: BLEU. Writes `predictions_<split>.txt`, `generations/<split>.jsonl`
and `eval_<split>.json` into the workdir (`dart_<split>` names for DART on an E2E run).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prefix_jax import cli


def main() -> None:
    parser = cli.Parser(prog="scripts/evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training run's directory")
    parser.add_argument("--split", required=True, choices=("dev", "test"))
    parser.add_argument("--task", choices=("e2e", "dart"), default=None,
                        help="default: the run's own task (its config.json)")
    parser.add_argument("--data_dir", default=None,
                        help="default: the run's data.dir, or ../shared/data/<task>")
    cli.add_decoding_flags(parser, num_beams=5, batch_size=10)
    parser.add_argument("--limit", type=int, default=0, help="first N sources only; 0 = all")
    args = parser.parse_args()
    cli.check_decoding_flags(args)
    if args.limit < 0:
        cli.fail(f"--limit={args.limit} must be >= 0 (0 = all)")
    if not os.path.isdir(args.workdir):
        cli.fail(f"--workdir={args.workdir} is not a directory; give a training run's workdir")

    from prefix_jax.tasks import report

    result = report.evaluate_workdir(
        args.workdir, args.split, args.task, args.data_dir, args.num_beams,
        args.length_penalty, args.max_new_tokens, args.batch_size, args.limit)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli.run(main)
