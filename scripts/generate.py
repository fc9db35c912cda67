r"""Generate from trained prefixes: one source per input line, one generation per output line.

  python scripts/generate.py --workdir runs/e2e --input mrs.txt --output out.txt            # greedy
  python scripts/generate.py --workdir runs/e2e --input mrs.txt --output out.txt --num_beams 5
  python scripts/generate.py --workdir runs/a --workdir runs/b --input mixed.txt --output out.txt
  python scripts/generate.py --workdir runs/e2e --input prompts.txt --output out.txt --raw

With one --workdir every line is a source (an E2E MR), formatted as in training. With several,
each line is `K<TAB>source`: K (0-based) picks the --workdir whose prefix that line uses, and
lines with different prefixes share batches. --raw takes each line (after any `K<TAB>`) as the
exact prompt text, with no task formatting (for checks against other tools).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prefix_jax import cli


def read_lines(path: str, n_runs: int) -> tuple[list[str], list[int]]:
    """Sources and the bank row of each (all 0 for one run); bad lines are one-line errors."""
    from prefix_jax.errors import UserError

    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--input={path} cannot be read ({e}); give a UTF-8 text file") from e
    if not lines:
        raise UserError(f"--input={path} is empty; give one source per line")
    sources, rows = [], []
    for number, line in enumerate(lines, 1):
        if n_runs > 1:
            k, tab, source = line.partition("\t")
            if not tab or not k.strip().isdigit():
                raise UserError(f"{path}:{number}: with {n_runs} --workdir flags each line must "
                                f"be 'K<TAB>source' (K = 0..{n_runs - 1}); got {line[:60]!r}")
            if int(k) >= n_runs:
                raise UserError(f"{path}:{number}: prefix {k} is out of range: there are "
                                f"{n_runs} --workdir flags (K = 0..{n_runs - 1})")
            rows.append(int(k))
            line = source
        if not line.strip():
            raise UserError(f"{path}:{number}: empty source; remove the line or fill it in")
        sources.append(line)
    return sources, rows or [0] * len(sources)


def main() -> None:
    parser = cli.Parser(prog="scripts/generate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", action="append", required=True,
                        help="a training run's directory; repeat for a bank of prefixes")
    parser.add_argument("--input", required=True, help="one source per line")
    parser.add_argument("--output", required=True, help="one generation per line")
    parser.add_argument("--raw", action="store_true", help="lines are exact prompts")
    cli.add_decoding_flags(parser, num_beams=1, batch_size=16)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of argmax")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args()
    cli.check_decoding_flags(args)
    if os.path.isdir(args.output):
        cli.fail(f"--output={args.output} is a directory; give a file path")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        cli.fail(f"--output={args.output}: directory {out_dir} does not exist; create it first")
    for w in args.workdir:
        if not os.path.isdir(w):
            cli.fail(f"--workdir={w} is not a directory; give a training run's workdir")

    from prefix_jax.serving import bank, decoding
    from prefix_jax.tasks import e2e

    choices = dict(num_beams=args.num_beams, length_penalty=args.length_penalty,
                   do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p)
    try:
        decoding.DecodeSettings(max_new_tokens=args.max_new_tokens, **choices)
    except ValueError as e:  # a decoding setting out of range, found before the model loads
        cli.fail(f"{e}; fix the flag")
    sources, rows = read_lines(args.input, len(args.workdir))
    run = bank.load(args.workdir)
    settings = decoding.settings_for(run.base.tokenizer, args.max_new_tokens,
                                     prefix=run.options, **choices)
    prompts = sources if args.raw else [e2e.format_source(s) for s in sources]
    generations = decoding.generate(run.base.module, run.base.params, run.prefixes,
                                    run.base.tokenizer, prompts, args.batch_size, settings,
                                    prefix_rows=rows, seed=args.seed)
    with open(args.output, "w", encoding="utf-8") as f:
        f.writelines(g.replace("\n", " ") + "\n" for g in generations)
    print(f"{len(generations)} generations written to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
