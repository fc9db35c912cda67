r"""Generate from trained prefixes: one source per input line, one generation per output line.

  python -m prefix_jax.generate --workdir=runs/e2e --input=mrs.txt --out=out.txt       # greedy
  python -m prefix_jax.generate --workdir=runs/e2e --input=mrs.txt --out=out.txt --num_beams=5
  python -m prefix_jax.generate --workdir=runs/a --workdir=runs/b --input=mixed.txt --out=out.txt
  python -m prefix_jax.generate --workdir=runs/e2e --input=prompts.txt --out=out.txt --raw

With one --workdir every line is a source (an E2E MR, a JSONL source), put into the prompt its
run trained with. With several, each line is `K<TAB>source`: K (0-based) picks the --workdir
whose prefix that line uses, and lines with different prefixes share batches. --raw takes each
line (after any `K<TAB>`) as the exact prompt text, with no task formatting (for checks against
other tools).

--out is written once decoding ends, atomically; an existing --out (or the --input file itself)
is refused unless --overwrite.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from prefix_jax import cli

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_multi_string(
    "workdir", None, "A training run's directory; repeat for a bank of prefixes.",
    flag_values=FLAGS)
_INPUT = flags.DEFINE_string("input", None, "Text file: one source per line.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Text file written: one generation per line.",
                           flag_values=FLAGS)
_RAW = flags.DEFINE_bool("raw", False, "Lines are exact prompts (no task formatting).",
                         flag_values=FLAGS)
cli.define_decoding_flags(FLAGS, num_beams=1, batch_size=16)
_DO_SAMPLE = flags.DEFINE_bool("do_sample", False, "Sample instead of argmax.", flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.", flag_values=FLAGS)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k likeliest tokens; 0 = off.",
                              flag_values=FLAGS)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off.", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out file (default: "
                               "refuse, so that no earlier result is lost).", flag_values=FLAGS)


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
    if not _WORKDIR.value:
        cli.fail("--workdir is required: a training run's directory (repeat for a bank)")
    if not _INPUT.value or not _OUT.value:
        cli.fail("--input and --out are required: the sources file and the file to write")
    cli.check_decoding_flags(FLAGS)
    if os.path.isdir(_OUT.value):
        cli.fail(f"--out={_OUT.value} is a directory; give a file path")
    out_dir = os.path.dirname(os.path.abspath(_OUT.value))
    if not os.path.isdir(out_dir):
        cli.fail(f"--out={_OUT.value}: directory {out_dir} does not exist; create it first")
    if os.path.exists(_OUT.value) and os.path.exists(_INPUT.value) \
            and os.path.samefile(_OUT.value, _INPUT.value):
        cli.fail(f"--out={_OUT.value} is the --input file; give another path for the "
                 "generations")
    if os.path.exists(_OUT.value) and not _OVERWRITE.value:
        cli.fail(f"--out={_OUT.value} exists (perhaps made with other settings); give a new "
                 "path, or pass --overwrite to replace it")
    for w in _WORKDIR.value:
        if not os.path.isdir(w):
            cli.fail(f"--workdir={w} is not a directory; give a training run's workdir")

    from prefix_jax import tasks
    from prefix_jax.serving import bank, decoding
    from prefix_jax.training import workdir as workdir_io

    choices = dict(num_beams=FLAGS.num_beams, length_penalty=FLAGS.length_penalty,
                   do_sample=_DO_SAMPLE.value, temperature=_TEMPERATURE.value,
                   top_k=_TOP_K.value, top_p=_TOP_P.value)
    try:
        decoding.DecodeSettings(max_new_tokens=FLAGS.max_new_tokens, **choices)
    except ValueError as e:  # a decoding setting out of range, found before the model loads
        cli.fail(f"{e}; fix the flag")
    sources, rows = read_lines(_INPUT.value, len(_WORKDIR.value))
    run = bank.load(_WORKDIR.value)
    settings = decoding.settings_for(run.base.tokenizer, FLAGS.max_new_tokens,
                                     prefix=run.options, **choices)
    # each row's prompt as its run trained on it (E2E's "\nDescription:", a JSONL data.prompt)
    prompt_of = [tasks.get(c, training=False).prompt for c in run.configs]
    prompts = sources if _RAW.value else [prompt_of[r](s) for s, r in zip(sources, rows)]
    generations = decoding.generate(run.base.module, run.base.params, run.prefixes,
                                    run.base.tokenizer, prompts, FLAGS.batch_size, settings,
                                    prefix_rows=rows, seed=_SEED.value, progress="generate")
    # one line each: any line break a reader splits on (\r, \x0b, \u2028, ...) becomes a space
    workdir_io.write_text(out_dir, os.path.basename(_OUT.value),
                          "".join(" ".join(g.splitlines()) + "\n" for g in generations))
    print(f"{len(generations)} generations written to {_OUT.value}", file=sys.stderr)


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
