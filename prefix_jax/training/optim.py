"""The optimizer: AdamW with warmup and linear decay on trainable leaves, zero updates elsewhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from prefix_jax.training.partition import FREEZE, TRAIN, path_str


def schedule(optim_cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then linear decay to `lr * final_lr_fraction` at num_steps."""
    warmup = min(optim_cfg.warmup_steps, max(num_steps - 1, 0))
    decay = optax.linear_schedule(optim_cfg.lr, optim_cfg.lr * optim_cfg.final_lr_fraction,
                                  max(num_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, optim_cfg.lr, warmup), decay],
                                [warmup])


def make(optim_cfg: ml_collections.ConfigDict, num_steps: int, label_tree,
         layer_masks: dict[str, np.ndarray] | None = None) -> optax.GradientTransformation:
    """`layer_masks` (`partition.layer_masks`): leaves of which only some layers train; the
    other layers get zero gradient (before clipping) and exactly zero update."""
    train_tx = optax.adamw(schedule(optim_cfg, num_steps), b1=optim_cfg.b1, b2=optim_cfg.b2,
                           eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
    if optim_cfg.grad_clip_norm > 0:
        train_tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), train_tx)
    if layer_masks:
        keep = _keep_layers(layer_masks)
        train_tx = optax.chain(keep, train_tx, keep)
    return optax.multi_transform({TRAIN: train_tx, FREEZE: optax.set_to_zero()}, label_tree)


def _keep_layers(layer_masks: dict[str, np.ndarray]) -> optax.GradientTransformation:
    def mask(path, u):
        hits = layer_masks.get(path_str(path))
        if hits is None:
            return u
        return u * jnp.asarray(hits, u.dtype).reshape(-1, *([1] * (u.ndim - 1)))

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(mask, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
