"""prefix_jax: prefix tuning of frozen transformers in JAX/Flax."""
