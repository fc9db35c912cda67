"""Training infrastructure: the trainable/frozen split, the optimizer, checkpoints, sharding,
multi-host start-up, preemption, the metric writer, the run identity and run log, and the
workdir lock."""
