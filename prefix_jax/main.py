r"""Train and evaluate a prefix: `python -m prefix_jax.main --config=FILE[:ARGS] --workdir=DIR`.

  --config=experiments/e2e_smollm2.py:runlocal   an experiment file and its get_config() arg
  --config.prefix.length=20                      override any config field
  --workdir=runs/x                               outputs; rerunning the same command resumes
  --allow_changes=optim.lr,data                  resume although these fields changed (else a
                                                 changed experiment is refused)

Mistakes in flags, config values, files or checkpoints end with one line on stderr and exit
status 2 (`--traceback` shows the stack); bugs keep their traceback.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from prefix_jax import cli

FLAGS = cli.flag_values()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                          flag_values=FLAGS, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.",
                               flag_values=FLAGS)
_ALLOW_CHANGES = flags.DEFINE_list(
    "allow_changes", [], "Resume although these config fields (or sections, e.g. optim) differ "
    "from the run that wrote the checkpoint; without it such a resume is refused.",
    flag_values=FLAGS)


def main() -> None:
    if _CONFIG.value is None:
        cli.fail("--config is required, e.g. --config=experiments/e2e_smollm2.py:runlocal")
    try:
        config = _CONFIG.value
        config.get("train")  # a config file that failed to load raises on first access
    except OSError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cli.fail(f"--config could not be loaded: {lines[-1]}; check the file path")
    if not _WORKDIR.value:
        cli.fail("--workdir is required: the directory for checkpoints, logs and results")
    from prefix_jax import train  # after flag checks: importing JAX takes seconds
    from prefix_jax.training.preemption import Stopped

    try:
        result = train.train_and_evaluate(config, _WORKDIR.value,
                                          allow_changes=_ALLOW_CHANGES.value)
    except Stopped as e:
        # A clean stop (checkpoint saved); the status says "killed by this signal" to schedulers.
        print(f"{e}: checkpoint saved; rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + e.signum)
    import jax

    if jax.process_index() != 0:  # one summary per run, not one per host
        return
    print("final:", ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in result.items()))


def run(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, __doc__, argv)


if __name__ == "__main__":
    run()
