"""A frozen base stored in int8 (`model.param_dtype=int8`, Llama family): every dense kernel as
int8 with one float32 scale per output channel, dequantized inside the matmul.

Prefix tuning never differentiates with respect to the base, only through it: gradients reach
the prefix through activations, so the int8 kernels need no quantization-aware weight gradient
(what breaks fine-tuning methods on 8-bit bases does not arise). The prefix and its optimizer
state stay float32; the int8 leaves are frozen, so they never enter the optimizer or a
checkpoint (partition.py keeps both to the trainable tree).

Scheme: symmetric, per output channel: `scale[o] = max_i |w[i, o]| / 127`, `q = round(w / scale)`
(an all-zero column gets scale 1). `Int8Dense` computes `(x @ q) * scale`, which equals
`x @ (q * scale)`. Embedding tables (a lookup, not a matmul), norms and biases are stored in
bfloat16, so the base takes a little more than half its bfloat16 bytes (the embedding's share).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

KERNEL_SCALE = "kernel_scale"  # the sibling leaf of each int8 `kernel`
OTHER_DTYPE = jnp.bfloat16  # every leaf that is not a dense kernel


class Int8Dense(nn.Module):
    """`nn.Dense` over an int8 kernel `[in, features]` and its float32 `kernel_scale`
    `[features]` (the parameters are filled by `quantize`, never trained)."""

    features: int
    dtype: Any = jnp.float32
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.zeros, (x.shape[-1], self.features),
                            jnp.int8)
        scale = self.param(KERNEL_SCALE, nn.initializers.ones, (self.features,), jnp.float32)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        y = (y.astype(jnp.float32) * scale).astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), OTHER_DTYPE)
            y = y + bias.astype(self.dtype)
        return y


def quantize_kernel(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 kernel, float32 scale `[..., out]`) of a float kernel `[..., in, out]`."""
    w = jnp.asarray(kernel, jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=-2)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize_kernel(q: jax.Array, scale: jax.Array) -> jax.Array:
    return q.astype(jnp.float32) * scale[..., None, :]


def quantize(params: dict, finish: Callable[[Any], Any] = lambda x: x) -> dict:
    """The base tree with every dense kernel (`.../kernel`, 2+ dims) as int8 plus its
    `kernel_scale`, every other leaf in bfloat16. Pure jnp, so it also runs under
    `jax.eval_shape` (abstract plans); `finish` is applied to each new leaf as soon as it
    exists (the loader passes `np.asarray`: host arrays, one leaf of float32 at a time)."""

    def walk(node: dict) -> dict:
        result = {}
        for key, value in node.items():
            if isinstance(value, dict):
                result[key] = walk(value)
            elif key == "kernel" and len(value.shape) >= 2:
                q, scale = quantize_kernel(value)
                result[key], result[KERNEL_SCALE] = finish(q), finish(scale)
            else:
                result[key] = finish(jnp.asarray(value).astype(OTHER_DTYPE))
        return result

    return walk(params)


def quantize_on_host(params: dict) -> dict:
    """`quantize` of host numpy params, computed on the CPU, returned as numpy arrays."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return quantize(params, finish=np.asarray)
