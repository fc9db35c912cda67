"""Which parameters train: labels from a regex over "/"-joined parameter paths.

`split` cuts the full tree `{"base": ..., "prefix": ...}` into a trainable and a frozen tree of
the same structure, each holding `optax.MaskedNode()` where the other has a leaf. The optimizer
(an optax `multi_transform` over the same labels) then keeps state for trainable leaves only, and
the train step can differentiate, update, donate and checkpoint the trainable tree alone while
the frozen one is read in place.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import optax

from prefix_jax.errors import UserError

TRAIN, FREEZE = "train", "freeze"


def path_str(path) -> str:
    """`("base", "layers", "q_proj", "kernel")` key path -> "base/layers/q_proj/kernel"."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


def labels(params, trainable_regex: str):
    """A tree like `params` with "train" where the path matches `trainable_regex` (re.search)."""
    try:
        pattern = re.compile(trainable_regex)
    except re.error as e:
        raise UserError(f"trainable={trainable_regex!r} is not a valid regex ({e}); e.g. "
                        "'^prefix/'") from None
    return jax.tree_util.tree_map_with_path(
        lambda p, _: TRAIN if pattern.search(path_str(p)) else FREEZE, params)


def split(params, label_tree):
    """(trainable, frozen): same structure as `params`, MaskedNode where the other side holds."""
    pick = lambda want: jax.tree.map(
        lambda lab, x: x if lab == want else optax.MaskedNode(), label_tree, params)
    return pick(TRAIN), pick(FREEZE)


def merge(trainable, frozen):
    """Inverse of `split`."""
    is_hole = lambda x: isinstance(x, optax.MaskedNode)
    return jax.tree.map(lambda t, f: f if is_hole(t) else t, trainable, frozen, is_leaf=is_hole)


def count(tree) -> int:
    """Number of scalars in the array leaves of `tree` (MaskedNode holes count nothing)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def trainable_paths(label_tree) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(label_tree)[0]
    return [path_str(p) for p, lab in flat if lab == TRAIN]
