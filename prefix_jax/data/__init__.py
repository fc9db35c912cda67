"""The input pipeline: tokenized examples -> length-bucketed, per-process batches.

It knows no task format: tasks (prefix_jax.tasks) hand it tokenized examples."""
