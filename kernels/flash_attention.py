"""Flash attention with a custom VJP: pads to the block sizes, picks the GPU or TPU kernels, skips blocks.

Same contract as `attention_reference` (positions + segment ids, causal, sliding window, soft-cap, GQA),
with fp32 online softmax and O(T) memory; the backward pass recomputes probabilities from the saved
log-sum-exp. On CPU the GPU kernels run in Pallas interpret mode (tests).
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from maxdpo.kernels import flash_attention_gpu, flash_attention_tpu
from maxdpo.kernels.attention_blocks import (KEY_PAD_SEGMENT, QUERY_PAD_SEGMENT, BlockSizes, MaskRule,
                                             block_visibility, next_power_of_2, pad_axis, pad_ids, round_up,
                                             visible_ranges)
from maxdpo.kernels.partitioning import ambient_mesh, kernel_axes, per_shard
from maxdpo.kernels.platform import default_backend

BACKENDS = {"gpu": flash_attention_gpu, "tpu": flash_attention_tpu}


def default_block_sizes(backend: str, q_len: int, kv_len: int, head_dim: int) -> BlockSizes:
    """Tiles that keep a [block_q, head_dim] query tile, two key tiles and the fp32 accumulator on chip.

    GPU: 128x64 forward (64x64 for head_dim 256), 64x64 backward (64x32 above head_dim 64: the dk/dv kernel
    keeps two fp32 [block_k, head_dim] accumulators in registers, which spilled at head_dim 256 and sat at
    the 255-register limit at 128; `tools/kernel_resources.py`), shrunk to short sequences.
    TPU: 512 (256 for head_dim 256), multiples of 128 for the lane dimension.
    """
    if backend == "tpu":
        big = 256 if head_dim > 128 else 512
        bq, bk = min(big, round_up(q_len, 128)), min(big, round_up(kv_len, 128))
        return BlockSizes(bq, bk, bq, bk)
    fit_q, fit_k = max(16, next_power_of_2(q_len)), max(16, next_power_of_2(kv_len))
    forward_q, backward_q = (64, 32) if head_dim > 128 else (128, 64)
    return BlockSizes(min(forward_q, fit_q), min(64, fit_k), min(backward_q, fit_q), min(32, fit_k))


class _Statics(NamedTuple):
    rule: MaskRule
    scale: float
    softcap: Optional[float]
    sizes: BlockSizes
    backend: str
    interpret: bool


def _visibility(statics: _Statics, ids, block_q: int, block_k: int) -> jax.Array:
    return block_visibility(statics.rule, *ids, block_q, block_k)  # [B, nq, nk]


def _forward(statics: _Statics, q, k, v, ids):
    kernels = BACKENDS[statics.backend]
    sizes = statics.sizes
    kv_ranges = visible_ranges(_visibility(statics, ids, sizes.block_q, sizes.block_k))  # [B, nq, 2]
    return kernels.forward(q, k, v, *ids, kv_ranges,
                           rule=statics.rule, scale=statics.scale, softcap=statics.softcap,
                           block_q=sizes.block_q, block_k=sizes.block_k, interpret=statics.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(statics: _Statics, q, k, v, ids):
    return _forward(statics, q, k, v, ids)[0]


def _flash_fwd(statics, q, k, v, ids):
    out, lse = _forward(statics, q, k, v, ids)
    return out, (q, k, v, ids, out, lse)


def _flash_bwd(statics, residuals, d_out):
    q, k, v, ids, out, lse = residuals
    sizes = statics.sizes
    table = _visibility(statics, ids, sizes.block_q_bwd, sizes.block_k_bwd)
    delta = jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32), d_out.astype(jnp.float32))  # [B, N, T]
    dq, dk, dv = BACKENDS[statics.backend].backward(
        q, k, v, *ids, visible_ranges(table), visible_ranges(jnp.swapaxes(table, 1, 2)), lse, delta, d_out,
        rule=statics.rule, scale=statics.scale, softcap=statics.softcap, block_q=sizes.block_q_bwd,
        block_k=sizes.block_k_bwd, interpret=statics.interpret)
    return dq, dk, dv, jax.tree.map(lambda _: None, ids)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array, kv_positions: jax.Array,
                    q_segment_ids: jax.Array, kv_segment_ids: jax.Array, scale: float, causal: bool = True,
                    sliding_window: Optional[int] = None, logit_softcap: Optional[float] = None,
                    shared_prefix: bool = False, block_sizes: Optional[BlockSizes] = None,
                    backend: Optional[str] = None, interpret: Optional[bool] = None) -> jax.Array:
    """q [B, T, N, H]; k, v [B, S, K, H] (N a multiple of K); ids [B, T] / [B, S]. Returns [B, T, N, H].

    shared_prefix: segment ids follow `attention_blocks.PREFIX_GROUP` (prompt | chosen | rejected rows).

    A query that sees no key at all returns zeros (the reference averages every value there instead);
    the model never produces one, since each token sees itself. Under a mesh it runs per shard, split
    as the logical rules map `batch` and `heads` / `kv_heads` (`partitioning.logical_rules`).
    """
    rule = MaskRule(causal, sliding_window, shared_prefix)
    local = functools.partial(_local_flash_attention, scale=scale, rule=rule, logit_softcap=logit_softcap,
                              block_sizes=block_sizes, backend=backend, interpret=interpret)
    mesh = ambient_mesh()
    if mesh is None:
        return local(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    rows, heads = _shard_axes(mesh, q.shape, k.shape)
    tiles, ids = P(rows, None, heads, None), P(rows, None)
    return per_shard(local, mesh, (tiles, tiles, tiles, ids, ids, ids, ids), tiles)(
        q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)


def _shard_axes(mesh, q_shape, kv_shape) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(batch axes, head axes) for q [B, T, N, H] and k/v [B, S, K, H].

    q and k/v heads split over the same axes (the common prefix of the `heads` and `kv_heads` axes), so
    every shard keeps whole query groups with their key/value head.
    """
    rows, _, heads, _ = kernel_axes(mesh, ("batch", None, "heads", None), q_shape)
    kv_heads = kernel_axes(mesh, ("batch", None, "kv_heads", None), kv_shape)[2]
    return rows, tuple(a for a, _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(heads, kv_heads)))


def _local_flash_attention(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, *, scale, rule,
                           logit_softcap, block_sizes, backend, interpret):
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    if num_heads % num_kv_heads or k.shape != v.shape or k.shape[-1] != head_dim:
        raise ValueError(f"flash_attention: q {q.shape} and k/v {k.shape}/{v.shape} are not grouped-query shapes")
    if rule.sliding_window is not None and rule.sliding_window < 1:
        raise ValueError(f"flash_attention: sliding_window must be >= 1, got {rule.sliding_window}")
    auto_backend, auto_interpret = default_backend()
    backend = backend or auto_backend
    interpret = auto_interpret if interpret is None else interpret
    sizes = block_sizes or default_block_sizes(backend, q_len, kv_len, head_dim)
    padded_q = round_up(q_len, math.lcm(sizes.block_q, sizes.block_q_bwd))
    padded_kv = round_up(kv_len, math.lcm(sizes.block_k, sizes.block_k_bwd))
    padded_dim = next_power_of_2(head_dim) if backend == "gpu" else round_up(head_dim, 128)
    q = pad_axis(pad_axis(q, padded_q, 1, 0), padded_dim, 3, 0)
    k, v = (pad_axis(pad_axis(x, padded_kv, 1, 0), padded_dim, 3, 0) for x in (k, v))
    ids = (*pad_ids(q_positions.astype(jnp.int32), q_segment_ids.astype(jnp.int32), padded_q, QUERY_PAD_SEGMENT),
           *pad_ids(kv_positions.astype(jnp.int32), kv_segment_ids.astype(jnp.int32), padded_kv, KEY_PAD_SEGMENT))
    statics = _Statics(rule, float(scale),
                       None if logit_softcap is None else float(logit_softcap), sizes, backend, bool(interpret))
    return _flash(statics, q, k, v, ids)[:, :q_len, :, :head_dim]
