"""The optimizer: AdamW with warmup and linear decay on trainable leaves, zero updates elsewhere."""

from __future__ import annotations

import ml_collections
import optax

from prefix_jax.partition import FREEZE, TRAIN


def schedule(optim_cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then linear decay to `lr * final_lr_fraction` at num_steps."""
    warmup = min(optim_cfg.warmup_steps, max(num_steps - 1, 0))
    decay = optax.linear_schedule(optim_cfg.lr, optim_cfg.lr * optim_cfg.final_lr_fraction,
                                  max(num_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, optim_cfg.lr, warmup), decay],
                                [warmup])


def make(optim_cfg: ml_collections.ConfigDict, num_steps: int, label_tree
         ) -> optax.GradientTransformation:
    train_tx = optax.adamw(schedule(optim_cfg, num_steps), b1=optim_cfg.b1, b2=optim_cfg.b2,
                           eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
    if optim_cfg.grad_clip_norm > 0:
        train_tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), train_tx)
    return optax.multi_transform({TRAIN: train_tx, FREEZE: optax.set_to_zero()}, label_tree)
