r"""Measurement of a design not shipped: greedy decoding with per-layer (unstacked) weights and
caches, a Python loop over the layers instead of the layer scan, against `decoding.decode` on
the same prompts (SmolLM2, no prefix, 64 new tokens, no stop token; first E2E dev MRs).

  JAX_PLATFORMS=cpu python scripts/decode_unstacked_prototype.py

Why: XLA:CPU copies each layer's weight slice out of the stacked arrays on every decoding step
of the scan (docs/decoding.md, the decode profile); with separate arrays per layer nothing is
sliced. Llama only, greedy only, plain KV cache: enough to measure what the copies cost, not a
decoder (no prefix, beams, stop tokens or other families). Prints the seconds of 3 calls of
each, alternating, and whether their tokens are equal.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from prefix_jax import configs, models
from prefix_jax.models import llama
from prefix_jax.models.core import KV, rope_angles
from prefix_jax.serving import decoding
from prefix_jax.tasks import e2e

NEW_TOKENS = 64

base = models.load(configs.model_config("smollm2"))
cfg = base.config
assert cfg.tie_embeddings, "the prototype reads logits off the tied embedding"
# one separate buffer per layer (jnp.array copies the slice once, here, not every step)
layer_params = tuple(jax.tree.map(lambda x, i=i: jnp.array(x[i]), base.params["layers"])
                     for i in range(cfg.n_layers))
top = {k: v for k, v in base.params.items() if k != "layers"}
layer = llama.DecoderLayer(cfg)


def forward(top, layer_params, tokens, positions, mask, caches, index):
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.take(top["embed_tokens"]["embedding"], tokens, axis=0).astype(dtype)
    cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.inv_freq())
    new = []
    for params, cache in zip(layer_params, caches):
        x, kv = layer.apply({"params": params}, x, cos, sin, mask, None, cache, index, None)
        new.append(kv)
    x = llama.RMSNorm(cfg.rms_eps).apply({"params": top["norm"]}, x)
    return x[:, -1] @ top["embed_tokens"]["embedding"].T, tuple(new)


@jax.jit
def greedy(top, layer_params, tokens, valid):
    b, t = tokens.shape
    slots = t + NEW_TOKENS
    shape = (b, slots, cfg.n_kv_heads, cfg.head_dim)
    caches = tuple(KV(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
                   for _ in range(cfg.n_layers))
    slot_valid = jnp.concatenate([valid, jnp.ones((b, NEW_TOKENS), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    query, key = jnp.arange(t)[:, None], jnp.arange(slots)[None, :]
    mask = ((key <= query) & (key < t))[None] & slot_valid[:, None, :]
    logits, caches = forward(top, layer_params, tokens, positions, mask, caches, 0)
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    out = jnp.zeros((b, NEW_TOKENS), jnp.int32).at[:, 0].set(token)

    def body(i, carry):
        token, caches, out, position = carry
        mask = (slot_valid & (jnp.arange(slots)[None, :] <= t + i - 1))[:, None, :]
        logits, caches = forward(top, layer_params, token[:, None], position[:, None], mask,
                                 caches, t + i - 1)
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        return token, caches, out.at[:, i].set(token), position + 1

    carry = (token, caches, out, positions[:, -1] + 1)
    return jax.lax.fori_loop(1, NEW_TOKENS, body, carry)[2]


def timed(fn) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = np.asarray(jax.block_until_ready(fn()))
    return out, time.perf_counter() - start


def main() -> None:
    pad = models.pad_id(base.tokenizer)
    sources, _ = e2e.group_references(e2e.read_pairs(configs.default_data_dir("e2e"), "dev"))
    settings = decoding.DecodeSettings(max_new_tokens=NEW_TOKENS, pad_id=pad)
    for b in (1, 16):
        ids = base.tokenizer([e2e.format_source(s) for s in sources[:b]],
                             add_special_tokens=False).input_ids
        tokens, valid = (jnp.asarray(a) for a in decoding.left_pad(ids, pad))
        sides = {
            "scan (decoding.decode)": lambda tokens=tokens, valid=valid: decoding.decode(
                base.module, base.params, None, tokens, valid, settings).tokens,
            "unstacked": lambda tokens=tokens, valid=valid: greedy(top, layer_params, tokens,
                                                                   valid),
        }
        outs = {name: timed(fn)[0] for name, fn in sides.items()}  # compile
        seconds = {name: [] for name in sides}
        for _ in range(3):
            for name, fn in sides.items():
                seconds[name].append(round(timed(fn)[1], 2))
        equal = int((outs["unstacked"] == outs["scan (decoding.decode)"]).all(axis=1).sum())
        print(f"batch {b}: " + "; ".join(f"{n} {s} s" for n, s in seconds.items())
              + f"; rows with equal tokens {equal}/{b}", flush=True)


if __name__ == "__main__":
    main()
