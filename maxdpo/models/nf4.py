"""NF4, QLoRA's 4-bit NormalFloat, stored as bitsandbytes stores it: the flattened tensor in blocks of 64
values, each block scaled by its absolute maximum (fp32) and every value replaced by the nearest of 16 codes
(quantiles of a normal distribution, exact 0 and +-1), two codes per byte, the first in the high nibble.
No double quantisation of the scales (0.5 bit per value more: 4.5 bits in all).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64
CODES = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                  0.7229568362236023, 1.0], np.float32)
THRESHOLDS = (CODES[1:] + CODES[:-1]) / 2  # a value takes the code of the interval it falls in


def quantize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w (any shape, size a multiple of 2 x BLOCK... or of 2: the last block may be short) -> (codes uint8
    [size / 2], absmax fp32 [ceil(size / BLOCK)])."""
    flat = w.reshape(-1).astype(jnp.float32)
    size = flat.size
    blocks = -(-size // BLOCK)
    padded = jnp.pad(flat, (0, blocks * BLOCK - size)).reshape(blocks, BLOCK)
    absmax = jnp.max(jnp.abs(padded), axis=1)  # [blocks]
    scaled = padded / jnp.where(absmax == 0, 1.0, absmax)[:, None]
    index = jnp.searchsorted(jnp.asarray(THRESHOLDS), scaled.reshape(-1)[:size], side="left").astype(jnp.uint8)
    pairs = index.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1], absmax


def dequantize(codes: jax.Array, absmax: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """The tensor of `shape` that `codes` and `absmax` (from `quantize`) stand for, in `dtype`."""
    index = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(-1)  # [size]
    values = jnp.asarray(CODES)[index]
    size = values.size
    scale = jnp.repeat(absmax, BLOCK, total_repeat_length=absmax.size * BLOCK)[:size]
    return (values * scale).reshape(shape).astype(dtype)
