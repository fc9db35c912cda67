"""The prefix: the trainable object of this project.

`build(prefix_cfg, model_cfg)` gives a Flax module whose `__call__()` (no inputs) returns the
per-layer keys and values to prepend, `KV([L, 1, P, n_kv_heads, head_dim] x 2)`; the leading 1 is
the batch axis, broadcast over the batch by the model. A multi-task run (`num_prefixes` N > 1)
returns `KV([L, N, P, ...])`, one prefix per task, and each batch row picks its task's with
`select`. Modes, layer subsets, reparameterizations
and inits are new modules or initializers here; the train loop only sees `module.apply(params)`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from prefix_jax.errors import UserError
from prefix_jax.models.llama import KV, LlamaConfig

MODES = ("kv",)

# Logical names of the prefix parameters' dimensions (see sharding.py): replicated by default.
LOGICAL_AXES = (
    (r"(^|/)(key|value)$", ("layers", "prefix", "kv_heads", "head_dim")),
    # multi-task runs: one prefix per task, the task axis replicated
    (r"(^|/)(task_keys|task_values)$", ("layers", None, "prefix", "kv_heads", "head_dim")),
)
INITS = ("random", "zero", "text")


class KVPrefix(nn.Module):
    """Mode `kv` (Li & Liang 2021; P-tuning v2; PEFT): free keys and values for every layer.

    Prefix keys carry no rotary position (as in PEFT): they are learned after RoPE would apply.
    """

    n_layers: int
    length: int
    n_kv_heads: int
    head_dim: int
    init_method: str = "random"
    init_std: float = 1.0
    num_prefixes: int = 1  # > 1: one prefix per task, params [L, N, P, K, D]

    @nn.compact
    def __call__(self) -> KV:
        # A single prefix keeps its [L, P, K, D] `key`/`value` params (and so its checkpoints);
        # several are `task_keys`/`task_values` [L, N, P, K, D], a leaf of another rank.
        initializer = (nn.initializers.zeros if self.init_method == "zero"
                       else nn.initializers.normal(self.init_std))
        if self.num_prefixes > 1:
            shape = (self.n_layers, self.num_prefixes, self.length, self.n_kv_heads,
                     self.head_dim)
            return KV(self.param("task_keys", initializer, shape),
                      self.param("task_values", initializer, shape))
        shape = (self.n_layers, self.length, self.n_kv_heads, self.head_dim)
        k = self.param("key", initializer, shape)
        v = self.param("value", initializer, shape)
        return KV(k[:, None], v[:, None])


def build(prefix_cfg: ml_collections.ConfigDict, model_cfg: LlamaConfig,
          num_prefixes: int = 1) -> nn.Module:
    if prefix_cfg.mode not in MODES:
        raise UserError(f"prefix.mode={prefix_cfg.mode!r} is not one of {MODES}")
    if prefix_cfg.init not in INITS:
        raise UserError(f"prefix.init={prefix_cfg.init!r} is not one of {INITS}")
    return KVPrefix(n_layers=model_cfg.n_layers, length=prefix_cfg.length,
                    n_kv_heads=model_cfg.n_kv_heads, head_dim=model_cfg.head_dim,
                    init_method=prefix_cfg.init, init_std=prefix_cfg.init_std,
                    num_prefixes=num_prefixes)


def init(module: nn.Module, rng: jax.Array, prefix_cfg: ml_collections.ConfigDict | None = None,
         base=None) -> dict:
    """Fresh prefix parameters.

    With `prefix.init='text'` the keys and values are the base model's own activations for the
    tokens of `prefix.init_text` (cycled to the prefix length), as in Li & Liang's real-word init:
    the prefix starts where real tokens live instead of at random points. `base` is the
    `models.LoadedModel` those activations come from.
    """
    params = module.init(rng)["params"]
    if prefix_cfg is not None and prefix_cfg.init == "text" and module.length:
        if base is None:
            raise ValueError("prefix.init='text' needs the base model")
        kv = text_activations(base, prefix_cfg.init_text, module.length)
        if module.num_prefixes > 1:  # every task starts from the same words
            n = module.num_prefixes
            params = {"task_keys": jnp.repeat(kv.k, n, axis=1),
                      "task_values": jnp.repeat(kv.v, n, axis=1)}
        else:
            params = {"key": kv.k[:, 0], "value": kv.v[:, 0]}
    return params


def text_activations(base, text: str, length: int) -> KV:
    """Per-layer keys/values `[L, 1, length, K, D]` of `text`'s tokens, cycled to `length`."""
    import jax.numpy as jnp
    import numpy as np

    from prefix_jax.models.llama import causal_mask

    ids = base.tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"prefix.init_text={text!r} has no tokens; give a few words")
    tokens = np.resize(np.asarray(ids, np.int32), length)[None]

    @jax.jit  # host inputs only: runs wherever the (possibly sharded) base params live
    def forward(params, tokens):
        positions = jnp.arange(tokens.shape[1])[None]
        mask = causal_mask(jnp.ones_like(tokens), 0)
        return base.module.apply({"params": params}, tokens, positions, mask)[1]

    return forward(base.params, tokens)


def select(kv: KV, rows: jax.Array | None) -> KV:
    """Each batch row's prefix from a multi-task `KV([L, N, ...])`: `rows` `[B]` -> `[L, B, ...]`.
    A single prefix (N = 1) is returned as it is, to be broadcast over the batch."""
    if kv.k.shape[1] == 1:
        return kv
    if rows is None:
        raise ValueError(f"a batch for {kv.k.shape[1]} prefixes needs 'prefix_ids'")
    return KV(jnp.take(kv.k, rows, axis=1), jnp.take(kv.v, rows, axis=1))


def length(prefix: KV | None) -> int:
    return 0 if prefix is None else prefix.k.shape[2]
