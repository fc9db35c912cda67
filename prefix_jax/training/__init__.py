"""Training infrastructure: the trainable/frozen split, the optimizer, checkpoints, sharding,
multi-host start-up, preemption and the metric writer."""
