"""Small builders shared by tests (configs and batches on the tiny random model, tools run
in this process)."""

import importlib
import os

import jax.numpy as jnp
import ml_collections

from experiments import e2e_smollm2
from prefix_jax import configs, train
from prefix_jax.data import pipeline
from prefix_jax.tasks import e2e, text_to_text

E2E_DIR = configs.default_data_dir("e2e")


class SimulatedCrashError(Exception):
    pass


def crash_run_after_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int
                               ) -> None:
    """Run training until the checkpoint of `step` is complete, then crash (as a kill would)."""
    def crash_at(saved_step: int) -> None:
        if saved_step == step:
            raise SimulatedCrashError(saved_step)

    try:
        train.train_and_evaluate(config, workdir, train.Hooks(after_checkpoint=crash_at))
    except SimulatedCrashError:
        pass
    else:
        raise AssertionError(f"the run ended without reaching the step-{step} checkpoint")


def runlocal_config(**overrides) -> ml_collections.ConfigDict:
    """The experiment's runlocal config with dotted-path overrides, e.g. `train__num_steps=3`."""
    config = e2e_smollm2.get_config("runlocal")
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny_batch(tokenizer, n: int = 4, bucket: int = 16) -> dict:
    pairs = e2e.read_pairs(E2E_DIR, "dev")[:n]
    data = text_to_text.tokenize_pairs(pairs, tokenizer, 512, "dev")
    return {k: jnp.asarray(v) for k, v in pipeline.collate(data, bucket, 2).items()}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(name: str, *args, capsys) -> tuple[int, str, str]:
    """`python -m prefix_jax.<name> ARGS...` in this process (no second JAX start-up), through
    the tool's own absl entry point: (exit status, stdout, stderr)."""
    tool = importlib.import_module(f"prefix_jax.{name}")
    try:
        tool.run([f"prefix_jax.{name}", *map(str, args)])
        status = 0
    except SystemExit as e:
        status = 0 if e.code is None else e.code
    out = capsys.readouterr()
    return status, out.out, out.err
