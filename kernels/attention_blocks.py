"""What the flash-attention kernels share: the element mask rule, block skipping, padding, block sizes.

The mask is the reference's rule (same segment, key position not later, inside the window), computed
from positions and segment ids, so packed rows, padding and prefix sharing need no special case. Block
skipping is derived from per-block minima and maxima of those ids: a (query block, key block) pair is
skipped only when no element in it can be visible, which holds for any positions, monotonic or not.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from maxdpo.kernels.tile_ops import matmul_nt

MASK_VALUE = -1e30  # finite, so a row with nothing visible yet never computes inf - inf
QUERY_PAD_SEGMENT, KEY_PAD_SEGMENT = -1, -2  # padding never matches a real segment or each other
# Prefix sharing: segment id = 4 * pair + branch (0 prompt, 1 chosen, 2 rejected); a query also sees
# the prompt of its own pair, i.e. keys whose segment is its own rounded down to a multiple of 4.
PREFIX_GROUP = 4


class MaskRule(NamedTuple):
    """Static part of the mask: causal, the sliding window (None = unbounded), shared prompts."""
    causal: bool
    sliding_window: Optional[int]
    shared_prefix: bool = False


class BlockSizes(NamedTuple):
    """Query/key tile sizes of the forward pass and of the backward pass."""
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int


def visible(rule: MaskRule, q_pos, q_seg, kv_pos, kv_seg):
    """Elementwise mask; q_* broadcast against kv_* (e.g. [bq, 1] against [1, bk])."""
    mask = q_seg == kv_seg
    if rule.shared_prefix:
        mask |= kv_seg == prompt_segment(q_seg)
    if rule.causal:
        mask &= q_pos >= kv_pos
    if rule.sliding_window is not None:
        mask &= q_pos - kv_pos < rule.sliding_window
    return mask


def prompt_segment(segment_ids):
    """The segment of the prompt a prefix-shared token belongs to (a bit mask: no sign ops for Mosaic)."""
    return segment_ids & ~(PREFIX_GROUP - 1)


def _block_extent(ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """(min, max) over each block of `block` columns: [B, L] -> two [B, L // block]. A strided window
    reduction rather than a reshape to [B, L // block, block], which XLA:TPU failed to lay out for some
    batch shapes ("Reshape should have supported layout", Llama-3-8B at 4 rows per v5p chip)."""
    window = (1, block)
    lowest = jax.lax.reduce_window(ids, jnp.iinfo(ids.dtype).max, jax.lax.min, window, window, "VALID")
    highest = jax.lax.reduce_window(ids, jnp.iinfo(ids.dtype).min, jax.lax.max, window, window, "VALID")
    return lowest, highest


def block_visibility(rule: MaskRule, q_pos, q_seg, kv_pos, kv_seg, block_q: int, block_k: int) -> jax.Array:
    """[B, T / block_q, S / block_k] bool: False where the whole tile is masked."""
    q_pos_lo, q_pos_hi = _block_extent(q_pos, block_q)
    q_seg_lo, q_seg_hi = _block_extent(q_seg, block_q)
    kv_pos_lo, kv_pos_hi = _block_extent(kv_pos, block_k)
    kv_seg_lo, kv_seg_hi = _block_extent(kv_seg, block_k)
    q = lambda x: x[:, :, None]  # noqa: E731
    kv = lambda x: x[:, None, :]  # noqa: E731
    if rule.shared_prefix:  # queries also reach down to their prompt's segment (monotonic in the id)
        q_seg_lo = prompt_segment(q_seg_lo)
    overlap = (q(q_seg_lo) <= kv(kv_seg_hi)) & (kv(kv_seg_lo) <= q(q_seg_hi))
    if rule.causal:
        overlap &= q(q_pos_hi) >= kv(kv_pos_lo)
    if rule.sliding_window is not None:
        overlap &= q(q_pos_lo) - kv(kv_pos_hi) < rule.sliding_window
    return overlap


def visible_ranges(table: jax.Array) -> jax.Array:
    """[..., n] bool -> [..., 2] int32 [first, last + 1) of the True entries ([0, 0) when none)."""
    n = table.shape[-1]
    index = jnp.arange(n, dtype=jnp.int32)
    first = jnp.min(jnp.where(table, index, n), axis=-1)
    last = jnp.max(jnp.where(table, index, -1), axis=-1)
    any_visible = last >= 0
    return jnp.stack([jnp.where(any_visible, first, 0), jnp.where(any_visible, last + 1, 0)], axis=-1)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_axis(x: jax.Array, length: int, axis: int, value=None) -> jax.Array:
    """Pads `axis` to `length` with `value`, or by repeating the last entry when value is None."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    if value is None:
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=value)


def pad_ids(positions: jax.Array, segment_ids: jax.Array, length: int, pad_segment: int):
    """Positions repeat the last one (keeps block extents tight); padding gets its own segment."""
    return pad_axis(positions, length, 1), pad_axis(segment_ids, length, 1, pad_segment)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def logits_tile(q: jax.Array, k: jax.Array, scale: float, softcap: Optional[float]):
    """q [bq, H] . k [bk, H] -> (logits [bq, bk] fp32, tanh of the soft-cap or None for the backward)."""
    logits = matmul_nt(q, k) * scale
    if softcap is None:
        return logits, None
    capped = jnp.tanh(logits / softcap)
    return capped * softcap, capped


def tile_gradients(q, k, v, d_out, lse, delta, mask, scale: float, softcap: Optional[float]):
    """One tile's recomputed probabilities and logit gradients, [bq, bk] fp32 each; lse, delta [bq, 1]."""
    logits, capped = logits_tile(q, k, scale, softcap)
    probs = jnp.where(mask, jnp.exp(logits - lse), 0.0)
    d_probs = matmul_nt(d_out, v)
    d_logits = probs * (d_probs - delta)
    if capped is not None:
        d_logits = d_logits * (1.0 - capped * capped)
    return probs, d_logits
