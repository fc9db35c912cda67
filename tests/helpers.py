"""Small builders shared by tests (configs and batches on the tiny random model)."""

import os

import jax.numpy as jnp
import ml_collections

from experiments import e2e_smollm2
from prefix_jax.data import e2e, pipeline

E2E_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                        "e2e"))


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
    data = pipeline.tokenize_pairs(pairs, tokenizer, 512, "dev")
    return {k: jnp.asarray(v) for k, v in pipeline.collate(data, bucket, 2).items()}
