"""The prefix: the trainable object of this project, in every variant the papers compare.

`build(prefix_cfg, model_cfg)` gives a Flax module whose `__call__(deterministic)` returns the
*flat* prefix, a dict of arrays (the parameters themselves when `reparam='none'`, the MLP's
output when `reparam='mlp'`). `compute(...)` turns that into what every attention layer reads,
per-layer keys and values `KV([L, 1 | N, P, n_kv_heads, head_dim])`, so the model, the decoder
and the bank see one thing whatever the variant:

- `mode='kv'` (Li & Liang; P-tuning v2; PEFT): free keys/values `[L', P, K, D]`, no rotary
  position (they are learned after RoPE would apply).
- `mode='hidden'`: free hidden states `[L', P, d]`, projected by each layer's own frozen input
  norm and K/V weights, keys rotated as positions 0..P-1.
- `mode='input'` (prompt tuning, the paper's "embedding-only"): free input embeddings `[P, d]`.
  The prompt precedes every real token and attends only to itself, so its keys/values at every
  layer are those of the base model run on the prompt alone: computing them once per step and
  prepending them is exactly prompt tuning (with `positions='after_prefix'`).
- `placement='infix'` (Table 5): the slots are seen only from the last source token on, i.e. by
  the queries that predict the target, not by the source.
- `layers` (kv/hidden): all, `top:K`, `bottom:K` or a list `0,3,-1`; the other layers get no
  prefix (their slots are masked: `masks.key_mask`; every mask is built in masks.py).
- `reparam='mlp'`: embedding `[P, d]` -> Linear(d, mlp_hidden) -> tanh -> Linear(mlp_hidden, the
  flat prefix of one slot), as in Li & Liang; `eject` keeps only its output.

A multi-task run (`num_prefixes` N > 1, kv mode without MLP) has `task_keys/task_values
[L', N, P, K, D]`; each batch row picks its task's prefix with `select`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prefix_jax.errors import UserError
from prefix_jax.models.core import KV, apply_rope, causal_mask, rms_norm, rope_angles
from prefix_jax.prefix import positions

MODES = ("kv", "hidden", "input")
PLACEMENTS = ("prefix", "infix")
REPARAMS = ("none", "mlp")
INITS = ("random", "zero", "vocab", "text")

# Logical names of the prefix parameters' dimensions (see sharding.py): replicated by default.
LOGICAL_AXES = (
    (r"(^|/)(key|value)$", ("layers", "prefix", "kv_heads", "head_dim")),
    # multi-task runs: one prefix per task, the task axis replicated
    (r"(^|/)(task_keys|task_values)$", ("layers", None, "prefix", "kv_heads", "head_dim")),
    (r"(^|/)hidden$", ("layers", "prefix", None)),
    (r"(^|/)(embeddings|embedding)$", ("prefix", None)),
)


def parse_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    """`prefix.layers` -> sorted layer indices: 'all', 'top:K', 'bottom:K' (K layers or K% of
    them, at least one) or '0,3,-1'."""
    spec = str(spec).strip()
    fix = (f"prefix.layers={spec!r}: use 'all', 'top:K', 'bottom:K' (1 <= K <= {n_layers}, or "
           f"K% of the layers) or "
           f"a comma-separated list of layers in [-{n_layers}, {n_layers - 1}]")
    if spec == "all":
        return tuple(range(n_layers))
    where, _, count = spec.partition(":")
    if where in ("top", "bottom"):
        if count.endswith("%") and count[:-1].isdigit() and 0 < int(count[:-1]) <= 100:
            count = str(max(1, round(n_layers * int(count[:-1]) / 100)))  # depth as a fraction
        if not count.isdigit() or not 1 <= int(count) <= n_layers:
            raise UserError(fix)
        k = int(count)
        return tuple(range(n_layers - k, n_layers)) if where == "top" else tuple(range(k))
    try:
        chosen = {int(x) % n_layers if -n_layers <= int(x) < n_layers else None
                  for x in spec.split(",")}
    except ValueError:
        raise UserError(fix) from None
    if None in chosen or not chosen:
        raise UserError(fix)
    return tuple(sorted(chosen))


class Prefix(nn.Module):
    """The trainable prefix of one variant (see the module docstring); returns the flat dict."""

    mode: str
    n_layers: int  # layers of the base model
    layers: tuple[int, ...]  # layers the prefix acts in (kv/hidden)
    length: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    reparam: str = "none"
    mlp_hidden: int = 512
    dropout: float = 0.0
    init_method: str = "random"
    init_std: float = 1.0
    num_prefixes: int = 1  # > 1: one prefix per task (kv mode, no MLP)

    def flat_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the flat prefix (= the parameters of `reparam='none'`)."""
        n, p = len(self.layers), self.length
        if self.mode == "kv":
            if self.num_prefixes > 1:
                shape = (n, self.num_prefixes, p, self.n_kv_heads, self.head_dim)
                return {"task_keys": shape, "task_values": shape}
            return {"key": (n, p, self.n_kv_heads, self.head_dim),
                    "value": (n, p, self.n_kv_heads, self.head_dim)}
        if self.mode == "hidden":
            return {"hidden": (n, p, self.d_model)}
        return {"embeddings": (p, self.d_model)}

    @nn.compact
    def __call__(self, deterministic: bool = True) -> dict[str, jax.Array]:
        shapes = self.flat_shapes()
        if self.reparam == "none":
            init = (nn.initializers.zeros if self.init_method == "zero"
                    else nn.initializers.normal(self.init_std))
            flat = {name: self.param(name, init, shape) for name, shape in shapes.items()}
        else:
            flat = self._mlp(shapes)
        if self.dropout and not deterministic:
            flat = {k: nn.Dropout(self.dropout)(v, deterministic=False) for k, v in flat.items()}
        return flat

    def _mlp(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
        """One MLP output row per prefix slot, cut into the flat arrays."""
        zero = nn.initializers.zeros
        embedding = self.param("embedding", nn.initializers.normal(1.0),
                               (self.length, self.d_model))
        hidden = nn.tanh(nn.Dense(self.mlp_hidden, name="mlp_in")(embedding))
        per_slot = {name: shape[:-3] + shape[-2:] if self.mode == "kv" else
                    (shape[0], shape[2]) if self.mode == "hidden" else shape[1:]
                    for name, shape in shapes.items()}
        width = sum(int(np.prod(s)) for s in per_slot.values())
        out_init = zero if self.init_method == "zero" else nn.initializers.lecun_normal()
        out = nn.Dense(width, name="mlp_out", kernel_init=out_init,
                       bias_init=zero)(hidden)  # [P, width]
        flat, start = {}, 0
        for name, shape in per_slot.items():
            size = int(np.prod(shape))
            piece = out[:, start:start + size].reshape(self.length, *shape)
            start += size
            # slot axis first -> the flat layout: [n, P, ...] per layer, [P, d] for input
            flat[name] = piece if self.mode == "input" else jnp.moveaxis(piece, 0, 1)
        return flat


def build(prefix_cfg: ml_collections.ConfigDict, model_cfg, num_prefixes: int = 1) -> Prefix:
    """The prefix module `prefix_cfg` describes, sized for `model_cfg`."""
    checks = [("mode", MODES), ("placement", PLACEMENTS), ("reparam", REPARAMS),
              ("init", INITS)]
    for field, allowed in checks:
        if prefix_cfg[field] not in allowed:
            raise UserError(f"prefix.{field}={prefix_cfg[field]!r} is not one of {allowed}")
    mode = prefix_cfg.mode
    model_cfg.capabilities.require_prefix_mode(mode, model_cfg.name)
    layers = parse_layers(prefix_cfg.layers, model_cfg.n_layers)
    if mode == "input" and prefix_cfg.layers != "all":
        raise UserError("prefix.mode='input' (prompt tuning) enters at the input only; "
                        "leave prefix.layers='all'")
    if mode == "input" and positions.resolve(prefix_cfg.positions, model_cfg,
                                             mode) != "after_prefix":
        raise UserError("prefix.mode='input' is prompt tuning: real tokens follow the prompt, "
                        "so set prefix.positions='after_prefix' (or 'default')")
    if num_prefixes > 1 and (mode != "kv" or prefix_cfg.reparam != "none"):
        raise UserError("several tasks (data.extra_dirs) need prefix.mode='kv' and "
                        "prefix.reparam='none'")
    return Prefix(mode=mode, n_layers=model_cfg.n_layers, layers=layers,
                  length=prefix_cfg.length, n_kv_heads=model_cfg.n_kv_heads,
                  head_dim=model_cfg.head_dim, d_model=model_cfg.d_model,
                  reparam=prefix_cfg.reparam, mlp_hidden=prefix_cfg.mlp_hidden,
                  dropout=prefix_cfg.dropout, init_method=prefix_cfg.init,
                  init_std=prefix_cfg.init_std, num_prefixes=num_prefixes)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """What a decoder (and every mask, see masks.py) must know of a trained prefix besides its
    keys and values. Hashable: it is part of the decoder's static settings."""

    position_offset: int = 0  # where real tokens' positions start (0, or P)
    prefix_layers: tuple[int, ...] | None = None  # layers the prefix acts in (None = all)
    infix: bool = False  # slots seen only from the last prompt token on


def decode_options(prefix_cfg: ml_collections.ConfigDict, model_cfg) -> DecodeOptions:
    n_layers = model_cfg.n_layers
    layers = parse_layers(prefix_cfg.get("layers", "all"), n_layers)
    return DecodeOptions(
        position_offset=positions.offset(prefix_cfg, model_cfg),
        prefix_layers=None if len(layers) == n_layers else layers,
        infix=prefix_cfg.get("placement", "prefix") == "infix")


def _to_all_layers(x: jax.Array, module: Prefix) -> jax.Array:
    """`[L', ...]` for the chosen layers -> `[L, ...]`, zeros where there is no prefix."""
    if len(module.layers) == module.n_layers:
        return x
    return jnp.zeros((module.n_layers, *x.shape[1:]), x.dtype).at[
        jnp.asarray(module.layers)].set(x)


def to_kv(module: Prefix, flat: dict, base_module, base_params: dict) -> KV:
    """Flat prefix -> `KV([L, 1 | N, P, K, D])` for every layer (see the module docstring)."""
    if module.mode == "kv":
        if module.num_prefixes > 1:
            k, v = flat["task_keys"], flat["task_values"]
        else:
            k, v = flat["key"][:, None], flat["value"][:, None]
        return KV(_to_all_layers(k, module), _to_all_layers(v, module))
    cfg = base_module.config
    cfg.capabilities.require_prefix_mode(module.mode, cfg.name)
    if module.mode == "hidden":
        return _project_hidden(flat["hidden"], module, cfg, base_params)
    p = module.length
    if not p:  # the model cannot run on an empty input: no prompt, no keys/values
        empty = jnp.zeros((cfg.n_layers, 1, 0, cfg.n_kv_heads, cfg.head_dim), cfg.dtype)
        return KV(empty, empty)
    tokens = jnp.zeros((1, p), jnp.int32)
    _, kv = base_module.apply({"params": base_params}, tokens, jnp.arange(p)[None],
                              causal_mask(jnp.ones_like(tokens), 0),
                              embeddings=flat["embeddings"][None])
    return kv


def _project_hidden(hidden: jax.Array, module: Prefix, cfg, base_params: dict) -> KV:
    """Per-layer hidden states `[L', P, d]` through that layer's input norm, K and V weights."""
    idx = jnp.asarray(module.layers)
    layer = base_params["layers"]
    normed = rms_norm(hidden, layer["input_layernorm"]["scale"][idx][:, None], cfg.rms_eps)
    dtype = jnp.dtype(cfg.dtype)

    def project(name):
        kernel = layer[name]["kernel"][idx].astype(dtype)
        out = jnp.einsum("npd,nde->npe", normed.astype(dtype), kernel)
        return out.reshape(*out.shape[:2], cfg.n_kv_heads, cfg.head_dim)

    cos, sin = rope_angles(jnp.arange(module.length)[None], cfg.head_dim, cfg.rope_theta)
    k = apply_rope(project("k_proj"), cos, sin)
    v = project("v_proj")
    return KV(_to_all_layers(k[:, None], module), _to_all_layers(v[:, None], module))


def compute(module: Prefix, params: dict, base_module, base_params: dict,
            dropout_rng: jax.Array | None = None) -> KV:
    """The per-layer keys/values of `params`; with `dropout_rng`, prefix dropout applies."""
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    flat = module.apply({"params": params}, deterministic=dropout_rng is None, rngs=rngs)
    return to_kv(module, flat, base_module, base_params)


def eject(module: Prefix, params: dict) -> tuple[Prefix, dict]:
    """An MLP-reparameterized prefix as the flat prefix it computes: the module and params of
    `reparam='none'` that give the same keys/values (for serving and smaller checkpoints)."""
    flat = module.apply({"params": params})
    return dataclasses.replace(module, reparam="none", dropout=0.0), flat


def init(module: Prefix, rng: jax.Array, prefix_cfg: ml_collections.ConfigDict | None = None,
         base=None) -> dict:
    """Fresh prefix parameters.

    `prefix.init`: 'random' (normal, `init_std`) or 'zero' come from the module; 'text' starts
    the flat prefix at the base model's own values for the tokens of `prefix.init_text`, cycled
    to the prefix length (Li & Liang's real-word init), 'vocab' at those of tokens sampled from
    the vocabulary (Lester et al.): embeddings for `input`, keys/values for `kv`, layer inputs for
    `hidden`. With `reparam='mlp'` the MLP is fitted to reproduce those values (the paper's
    init of the reparameterized prefix). `base` is the `models.LoadedModel` they come from.
    """
    params = module.init(rng)["params"]
    method = module.init_method
    if prefix_cfg is None or method not in ("text", "vocab") or not module.length:
        return params
    if base is None:
        raise ValueError(f"prefix.init={method!r} needs the base model")
    if base.config.capabilities.kind != "decoder":  # an encoder: no causal activations to copy
        raise UserError(f"prefix.init={method!r} reads a decoder's activations; use "
                        "prefix.init='random' or 'zero' with this model")
    if method == "text":
        tokens = text_tokens(base.tokenizer, prefix_cfg.init_text, module.length)
    else:
        tokens = sample_vocabulary(base.tokenizer, module.length, rng)
    target = token_values(module, base, tokens)
    if module.reparam == "none":
        return target
    return fit_mlp(module, params, target, prefix_cfg.init_fit_steps)


def sample_vocabulary(tokenizer, length: int, rng: jax.Array) -> np.ndarray:
    """`length` distinct-if-possible ordinary token ids from the 5000 lowest ids (BPE ids are
    roughly ordered by frequency; Lester et al. sample among the 5000 most common)."""
    special = set(tokenizer.all_special_ids)
    pool = np.asarray([i for i in range(min(5000, len(tokenizer))) if i not in special])
    seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
    return np.random.default_rng(seed).choice(pool, length, replace=length > len(pool))


def token_values(module: Prefix, base, tokens: np.ndarray) -> dict:
    """The flat prefix whose slots hold the base model's values for `tokens` `[P]`."""
    if module.mode == "input":
        table = np.asarray(base.params["embed_tokens"]["embedding"])
        return {"embeddings": jnp.asarray(table[tokens], jnp.float32)}
    kv, layer_inputs = _activations(base, tokens)
    idx = np.asarray(module.layers)
    if module.mode == "hidden":
        return {"hidden": layer_inputs[idx, 0]}
    if module.num_prefixes > 1:  # every task starts from the same words
        n = module.num_prefixes
        return {"task_keys": jnp.repeat(kv.k[idx], n, axis=1),
                "task_values": jnp.repeat(kv.v[idx], n, axis=1)}
    return {"key": kv.k[idx, 0], "value": kv.v[idx, 0]}


def _activations(base, tokens: np.ndarray) -> tuple[KV, jax.Array]:
    """Keys/values `[L, 1, P, K, D]` and layer inputs `[L, 1, P, d]` of `tokens`."""

    @jax.jit  # host inputs only: runs wherever the (possibly sharded) base params live
    def forward(params, tokens):
        positions = jnp.arange(tokens.shape[1])[None]
        mask = causal_mask(jnp.ones_like(tokens), 0)
        (_, kv), state = base.module.apply({"params": params}, tokens, positions, mask,
                                           return_hidden=True, mutable=["intermediates"])
        sown = state.get("intermediates", {})  # Llama sows its layer inputs; GPT-2 does not
        return kv, (sown["layers"]["layer_input"][0] if sown else None)

    kv, layer_inputs = forward(base.params, jnp.asarray(tokens, jnp.int32)[None])
    kv = KV(kv.k.astype(jnp.float32), kv.v.astype(jnp.float32))
    return kv, None if layer_inputs is None else layer_inputs.astype(jnp.float32)


def text_tokens(tokenizer, text: str, length: int) -> np.ndarray:
    """The token ids of `text`, cycled to `length`."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"prefix.init_text={text!r} has no tokens; give a few words")
    return np.resize(np.asarray(ids, np.int32), length)


def text_activations(base, text: str, length: int) -> KV:
    """Per-layer keys/values `[L, 1, length, K, D]` of `text`'s tokens, cycled to `length`."""
    return _activations(base, text_tokens(base.tokenizer, text, length))[0]


def fit_mlp(module: Prefix, params: dict, target: dict, steps: int) -> dict:
    """MLP parameters whose output approximates the flat prefix `target` (Adam on the mean
    squared error, relative to the target's scale), starting from `params`."""
    import optax

    scale = {k: jnp.mean(jnp.square(v)) + 1e-8 for k, v in target.items()}

    def loss(p):
        out = module.apply({"params": p})
        return sum(jnp.mean(jnp.square(out[k] - target[k])) / scale[k] for k in target)

    tx = optax.adam(optax.cosine_decay_schedule(1e-2, max(steps, 1)))

    @jax.jit
    def run(p):
        def step(carry, _):
            p, state = carry
            grads = jax.grad(loss)(p)
            updates, state = tx.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
        return p, loss(p)

    fitted, error = run(params)
    from absl import logging

    logging.info("MLP prefix fitted to the init values: relative squared error %.4f after %d "
                 "steps", float(error), steps)
    return fitted


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
