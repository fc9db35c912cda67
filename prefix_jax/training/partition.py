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


def _compile(trainable_regex: str) -> re.Pattern:
    try:
        return re.compile(trainable_regex)
    except re.error as e:
        raise UserError(f"trainable={trainable_regex!r} is not a valid regex ({e}); e.g. "
                        "'^prefix/'") from None


def _layer_paths(path: str, n_layers: int) -> list[tuple[str, str]]:
    """Per-layer names of a leaf stacked over layers (`base/layers/...`, leading axis L): layer
    i is both `base/layers/i/...` and `base/layers/{i - L}/...` (-1 = the top layer)."""
    head, sep, tail = path.partition("/layers/")
    return [(f"{head}/layers/{i}/{tail}", f"{head}/layers/{i - n_layers}/{tail}")
            for i in range(n_layers)] if sep else []


def labels(params, trainable_regex: str, masks: dict[str, np.ndarray] | None = None):
    """A tree like `params` with "train" where the path matches `trainable_regex` (re.search),
    or where it matches some layer of a stacked leaf (`masks`, from `layer_masks`; computed
    here when not given)."""
    if masks is None:
        masks = layer_masks(params, trainable_regex)
    pattern = _compile(trainable_regex)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: TRAIN if pattern.search(path_str(p)) or path_str(p) in masks else FREEZE,
        params)


def layer_masks(params, trainable_regex: str) -> dict[str, np.ndarray]:
    """Stacked leaves the regex selects only some layers of: path -> `[L]` bool.

    Layers are scanned, so one leaf holds every layer; fine-tuning the top 2 layers
    (`trainable='^base/layers/-[12]/'`) trains those rows of the leaf and must leave the others
    bitwise unchanged: the optimizer zeroes their gradients and updates (`optim.make`)."""
    pattern = _compile(trainable_regex)
    masks = {}
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_str(p)
        if pattern.search(path) or not np.ndim(x):
            continue
        names = _layer_paths(path, np.shape(x)[0])
        hits = np.asarray([any(pattern.search(n) for n in pair) for pair in names], bool)
        if hits.any():
            masks[path] = hits
    return masks


def split(params, label_tree):
    """(trainable, frozen): same structure as `params`, MaskedNode where the other side holds."""
    pick = lambda want: jax.tree.map(
        lambda lab, x: x if lab == want else optax.MaskedNode(), label_tree, params)
    return pick(TRAIN), pick(FREEZE)


def merge(trainable, frozen):
    """Inverse of `split`."""
    is_hole = lambda x: isinstance(x, optax.MaskedNode)
    return jax.tree.map(lambda t, f: f if is_hole(t) else t, trainable, frozen, is_leaf=is_hole)


def count(tree, layer_masks: dict[str, np.ndarray] | None = None) -> int:
    """Number of scalars in the array leaves of `tree` (MaskedNode holes count nothing); with
    `layer_masks`, only the trained layers of partly trained stacked leaves."""
    masks = layer_masks or {}
    total = 0
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        size = int(np.prod(x.shape))
        hits = masks.get(path_str(p))
        total += size if hits is None else size // len(hits) * int(hits.sum())
    return total


def trainable_paths(label_tree) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(label_tree)[0]
    return [path_str(p) for p, lab in flat if lab == TRAIN]
