"""Flash attention for TPUs (Pallas, Mosaic lowering): forward, dq and dk/dv kernels.

Heads-major layout [B, N, T, H] so each tile is a (rows, head_dim) VMEM block. The key-block grid axis
is a reduction with fp32 scratch accumulators; the visible block range arrives by scalar prefetch and
the key index map is clamped into it, so a skipped block is neither computed nor copied from HBM
(the pipeline re-uses the block already resident). Grouped-query attention indexes the kv head n // G.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from maxdpo.kernels.tile_ops import matmul, matmul_tn
from maxdpo.kernels.attention_blocks import (MASK_VALUE, logits_tile, tile_gradients, visible)

LANES = 128  # running max / sum are kept lane-replicated, as TPU vregs like them


def _range(ranges_ref, row, block):
    """(first, end) of the visible range of `row`, and `block` clamped into it (valid when empty too)."""
    first, end = ranges_ref[2 * row], ranges_ref[2 * row + 1]
    return first, end, jnp.minimum(jnp.maximum(block, first), jnp.maximum(end - 1, first))


def _query_grid_specs(num_q_blocks: int, group: int, block_q: int, block_k: int, head_dim: int):
    """BlockSpecs (q tile, k/v tile, q ids, kv ids) of a (batch, head, q block, kv block) grid whose kv index
    is clamped into the q block's visible range (scalar-prefetched ranges)."""
    def kv_tile(b, n, i, j, ranges):
        return b, jax.lax.div(n, group), _range(ranges, b * num_q_blocks + i, j)[2], 0

    def kv_ids_tile(b, n, i, j, ranges):
        return b, 0, _range(ranges, b * num_q_blocks + i, j)[2]

    return (pl.BlockSpec((None, None, block_q, head_dim), lambda b, n, i, j, r: (b, n, i, 0)),
            pl.BlockSpec((None, None, block_k, head_dim), kv_tile),
            pl.BlockSpec((None, block_q, 1), lambda b, n, i, j, r: (b, i, 0)),
            pl.BlockSpec((None, 1, block_k), kv_ids_tile))


def _ids(q_pos, q_seg, kv_pos, kv_seg):
    """[B, T] ids -> q side [B, T, 1], key side [B, 1, S] (rows against lanes inside the kernel)."""
    return q_pos[:, :, None], q_seg[:, :, None], kv_pos[:, None, :], kv_seg[:, None, :]


def _forward_kernel(ranges_ref, q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, out_ref,
                    lse_ref, max_ref, sum_ref, acc_ref, *, rule, scale, softcap, num_q_blocks):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    first, end, _ = _range(ranges_ref, b * num_q_blocks + i, j)

    @pl.when(j == 0)
    def _init():
        max_ref[...] = jnp.full(max_ref.shape, MASK_VALUE, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j >= first) & (j < end))
    def _accumulate():
        logits, _ = logits_tile(q_ref[...], k_ref[...], scale, softcap)  # [bq, bk]
        mask = visible(rule, q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...])
        logits = jnp.where(mask, logits, MASK_VALUE)
        previous = max_ref[...]  # [bq, LANES]
        new_max = jnp.maximum(previous, jnp.max(logits, axis=1, keepdims=True))
        probs = jnp.where(mask, jnp.exp(logits - new_max[:, :1]), 0.0)
        correction = jnp.exp(previous - new_max)
        sum_ref[...] = sum_ref[...] * correction + jnp.sum(probs, axis=1, keepdims=True)
        v = v_ref[...]
        acc_ref[...] = acc_ref[...] * correction[:, :1] + matmul(
            probs.astype(v.dtype), v)
        max_ref[...] = new_max

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        row_sum = sum_ref[...][:, :1]
        seen = row_sum > 0
        out_ref[...] = (acc_ref[...] / jnp.where(seen, row_sum, 1.0)).astype(out_ref.dtype)
        lse_ref[...] = jnp.where(seen, max_ref[...][:, :1] + jnp.log(jnp.where(seen, row_sum, 1.0)), jnp.inf)


def forward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, kv_ranges, *, rule, scale, softcap, block_q, block_k,
            interpret):
    """Padded [B, T, N, H] inputs -> (out [B, T, N, H], lse [B, N, T, 1] fp32)."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, group = k.shape[1], num_heads // k.shape[2]
    num_q_blocks = q_len // block_q

    q_block, kv_block, q_ids, kv_ids = _query_grid_specs(num_q_blocks, group, block_q, block_k, head_dim)
    kernel = jax.tree_util.Partial(_forward_kernel, rule=rule, scale=scale, softcap=softcap,
                                   num_q_blocks=num_q_blocks)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, num_heads, num_q_blocks, kv_len // block_k),
            in_specs=[q_block, kv_block, kv_block, q_ids, q_ids, kv_ids, kv_ids],
            out_specs=[q_block, pl.BlockSpec((None, None, block_q, 1), lambda b, n, i, j, r: (b, n, i, 0))],
            scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32), pltpu.VMEM((block_q, LANES), jnp.float32),
                            pltpu.VMEM((block_q, head_dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((batch, num_heads, q_len, head_dim), q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, q_len, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="flash_attention_forward_tpu",
    )(kv_ranges.reshape(-1), jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
      *_ids(q_pos, q_seg, kv_pos, kv_seg))
    return jnp.swapaxes(out, 1, 2), lse


def _dq_kernel(ranges_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, q_pos_ref, q_seg_ref, kv_pos_ref,
               kv_seg_ref, dq_ref, dq_acc_ref, *, rule, scale, softcap, num_q_blocks):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    first, end, _ = _range(ranges_ref, b * num_q_blocks + i, j)

    @pl.when(j == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

    @pl.when((j >= first) & (j < end))
    def _accumulate():
        k = k_ref[...]
        mask = visible(rule, q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...])
        _, d_logits = tile_gradients(q_ref[...], k, v_ref[...], d_out_ref[...], lse_ref[...], delta_ref[...],
                                     mask, scale, softcap)
        dq_acc_ref[...] += matmul(d_logits.astype(k.dtype), k)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(ranges_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, q_pos_ref, q_seg_ref, kv_pos_ref,
                kv_seg_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, *, rule, scale, softcap, num_kv_blocks):
    b, j, head, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    first, end, _ = _range(ranges_ref, b * num_kv_blocks + j, i)

    @pl.when((head == 0) & (i == 0))
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    @pl.when((i >= first) & (i < end))
    def _accumulate():
        q, d_out = q_ref[...], d_out_ref[...]
        mask = visible(rule, q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...])
        probs, d_logits = tile_gradients(q, k_ref[...], v_ref[...], d_out, lse_ref[...], delta_ref[...], mask,
                                         scale, softcap)
        dk_acc_ref[...] += matmul_tn(d_logits.astype(q.dtype), q)
        dv_acc_ref[...] += matmul_tn(probs.astype(d_out.dtype), d_out)

    @pl.when((head == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def backward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, kv_ranges, q_ranges, lse, delta, d_out, *, rule, scale,
             softcap, block_q, block_k, interpret):
    """Padded inputs, lse and delta = rowsum(out * d_out) [B, N, T] -> dq, dk, dv ([B, T, N, H] / [B, S, K, H])."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    num_q_blocks, num_kv_blocks = q_len // block_q, kv_len // block_k
    delta = delta[..., None]  # [B, N, T, 1], like lse
    q, k, v, d_out = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, d_out))  # heads-major
    ids = _ids(q_pos, q_seg, kv_pos, kv_seg)
    statics = dict(rule=rule, scale=scale, softcap=softcap)

    q_block, kv_block, q_ids, kv_ids = _query_grid_specs(num_q_blocks, group, block_q, block_k, head_dim)
    row_stats = pl.BlockSpec((None, None, block_q, 1), lambda b, n, i, j, r: (b, n, i, 0))
    dq = pl.pallas_call(
        jax.tree_util.Partial(_dq_kernel, num_q_blocks=num_q_blocks, **statics),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, num_heads, num_q_blocks, num_kv_blocks),
            in_specs=[q_block, kv_block, kv_block, q_block, row_stats, row_stats, q_ids, q_ids, kv_ids, kv_ids],
            out_specs=q_block, scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="flash_attention_dq_tpu",
    )(kv_ranges.reshape(-1), q, k, v, d_out, lse, delta, *ids)

    def q_index(b, h, j, g, i, ranges):
        return b, h * group + g, _range(ranges, b * num_kv_blocks + j, i)[2], 0

    def q_ids_index(b, h, j, g, i, ranges):
        return b, _range(ranges, b * num_kv_blocks + j, i)[2], 0

    q_tile = pl.BlockSpec((None, None, block_q, head_dim), q_index)
    stats_tile = pl.BlockSpec((None, None, block_q, 1), q_index)
    kv_tile = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, j, g, i, r: (b, h, j, 0))
    dk, dv = pl.pallas_call(
        jax.tree_util.Partial(_dkv_kernel, num_kv_blocks=num_kv_blocks, **statics),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, num_kv_heads, num_kv_blocks, group, num_q_blocks),
            in_specs=[q_tile, kv_tile, kv_tile, q_tile, stats_tile, stats_tile,
                      pl.BlockSpec((None, block_q, 1), q_ids_index), pl.BlockSpec((None, block_q, 1), q_ids_index),
                      pl.BlockSpec((None, 1, block_k), lambda b, h, j, g, i, r: (b, 0, j)),
                      pl.BlockSpec((None, 1, block_k), lambda b, h, j, g, i, r: (b, 0, j))],
            out_specs=[kv_tile, kv_tile],
            scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32)] * 2),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret, name="flash_attention_dkv_tpu",
    )(q_ranges.reshape(-1), q, k, v, d_out, lse, delta, *ids)
    return tuple(jnp.swapaxes(x, 1, 2) for x in (dq, dk, dv))
