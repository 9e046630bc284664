"""Flash attention for GPUs (Pallas, Triton lowering): forward, dq and dk/dv kernels.

Layout is the model's [B, T, N, H] (no transposes). One program per (batch, head, query block) walks
only the key blocks in its visible range (causal and window blocks are never loaded); the dk/dv kernel
runs per (batch, kv head, key block) and loops over the query heads of its group, so K/V are never
repeated for grouped-query attention. Sequences arrive padded to the block sizes (flash_attention.py).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from maxdpo.kernels.tile_ops import matmul, matmul_tn
from maxdpo.kernels.attention_blocks import (MASK_VALUE, MaskRule, logits_tile, tile_gradients,
                                             visible)


def _compiler_params(num_warps: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


# The forward's [block_q, block_k] logits and [block_q, head_dim] accumulator take 8 warps at every head_dim
# (with 4 at head_dim 64 it sat at 232-251 registers); the backward's 64x32 tiles fit 4 warps up to 64.
FORWARD_WARPS = 8


def _backward_warps(head_dim: int) -> int:
    return 4 if head_dim <= 64 else 8


def _forward_kernel(ranges_ref, q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref,
                    out_ref, lse_ref, *, rule: MaskRule, scale: float, softcap: Optional[float], block_k: int):
    q = q_ref[...]  # [bq, H]
    q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]  # [bq, 1]

    def step(j, carry):
        acc, row_max, row_sum = carry
        keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        logits, _ = logits_tile(q, k_ref[keys, :], scale, softcap)  # [bq, bk]
        mask = visible(rule, q_pos, q_seg, kv_pos_ref[keys][None, :], kv_seg_ref[keys][None, :])
        logits = jnp.where(mask, logits, MASK_VALUE)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))  # [bq]
        probs = jnp.where(mask, jnp.exp(logits - new_max[:, None]), 0.0)  # [bq, bk]
        correction = jnp.exp(row_max - new_max)
        v = v_ref[keys, :]
        acc = acc * correction[:, None] + matmul(probs.astype(v.dtype), v)
        return acc, new_max, row_sum * correction + jnp.sum(probs, axis=1)

    block_q, head_dim = q.shape
    init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, row_max, row_sum = jax.lax.fori_loop(ranges_ref[0], ranges_ref[1], step, init)
    seen = row_sum > 0  # rows that see no key at all return 0 and pass no gradient
    out_ref[...] = (acc / jnp.where(seen, row_sum, 1.0)[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), jnp.inf)


def forward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, kv_ranges, *, rule, scale, softcap, block_q, block_k,
            interpret):
    """Padded inputs -> (out [B, T, N, H], lse [B, N, T] fp32). kv_ranges [B, T/bq, 2]."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, group = k.shape[1], num_heads // k.shape[2]
    kernel = jax.tree_util.Partial(_forward_kernel, rule=rule, scale=scale, softcap=softcap, block_k=block_k)
    q_block = pl.BlockSpec((None, block_q, None, head_dim), lambda b, n, i: (b, i, n, 0))
    kv_whole = pl.BlockSpec((None, kv_len, None, head_dim), lambda b, n, i: (b, 0, n // group, 0))
    q_ids = pl.BlockSpec((None, block_q), lambda b, n, i: (b, i))
    kv_ids = pl.BlockSpec((None, kv_len), lambda b, n, i: (b, 0))
    return pl.pallas_call(
        kernel, grid=(batch, num_heads, q_len // block_q),
        in_specs=[pl.BlockSpec((None, None, 2), lambda b, n, i: (b, i, 0)), q_block, kv_whole, kv_whole,
                  q_ids, q_ids, kv_ids, kv_ids],
        out_specs=[q_block, pl.BlockSpec((None, None, block_q), lambda b, n, i: (b, n, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)],
        compiler_params=_compiler_params(FORWARD_WARPS), interpret=interpret, name="flash_attention_forward",
    )(kv_ranges, q, k, v, q_pos, q_seg, kv_pos, kv_seg)


def _dq_kernel(ranges_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, q_pos_ref, q_seg_ref,
               kv_pos_ref, kv_seg_ref, dq_ref, *, rule, scale, softcap, block_k):
    q, d_out = q_ref[...], d_out_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]  # [bq, 1]
    q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]

    def step(j, dq):
        keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k = k_ref[keys, :]
        mask = visible(rule, q_pos, q_seg, kv_pos_ref[keys][None, :], kv_seg_ref[keys][None, :])
        _, d_logits = tile_gradients(q, k, v_ref[keys, :], d_out, lse, delta, mask, scale, softcap)
        return dq + matmul(d_logits.astype(k.dtype), k)

    dq = jax.lax.fori_loop(ranges_ref[0], ranges_ref[1], step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(ranges_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, q_pos_ref, q_seg_ref,
                kv_pos_ref, kv_seg_ref, dk_ref, dv_ref, *, rule, scale, softcap, block_q):
    k, v = k_ref[...], v_ref[...]  # [bk, H]
    kv_pos, kv_seg = kv_pos_ref[...][None, :], kv_seg_ref[...][None, :]  # [1, bk]
    first, count = ranges_ref[0], ranges_ref[1] - ranges_ref[0]
    group = q_ref.shape[1]

    def step(index, carry):
        dk, dv = carry
        head, i = index // count, first + index % count
        queries = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        q, d_out = q_ref[queries, head, :], d_out_ref[queries, head, :]  # [bq, H]
        mask = visible(rule, q_pos_ref[queries][:, None], q_seg_ref[queries][:, None], kv_pos, kv_seg)
        probs, d_logits = tile_gradients(q, k, v, d_out, lse_ref[head, queries][:, None],
                                         delta_ref[head, queries][:, None], mask, scale, softcap)
        return dk + matmul_tn(d_logits.astype(q.dtype), q), dv + matmul_tn(probs.astype(d_out.dtype), d_out)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, group * count, step, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, kv_ranges, q_ranges, lse, delta, d_out, *, rule, scale,
             softcap, block_q, block_k, interpret):
    """Padded inputs, lse and delta = rowsum(out * d_out) [B, N, T] -> (dq, dk, dv). q_ranges [B, S/bk, 2]
    lists the query blocks of each key block."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    statics = dict(rule=rule, scale=scale, softcap=softcap)
    params = _compiler_params(_backward_warps(head_dim))

    q_block = pl.BlockSpec((None, block_q, None, head_dim), lambda b, n, i: (b, i, n, 0))
    kv_whole = pl.BlockSpec((None, kv_len, None, head_dim), lambda b, n, i: (b, 0, n // group, 0))
    row_stats = pl.BlockSpec((None, None, block_q), lambda b, n, i: (b, n, i))
    dq = pl.pallas_call(
        jax.tree_util.Partial(_dq_kernel, block_k=block_k, **statics), grid=(batch, num_heads, q_len // block_q),
        in_specs=[pl.BlockSpec((None, None, 2), lambda b, n, i: (b, i, 0)), q_block, kv_whole, kv_whole, q_block,
                  row_stats, row_stats, pl.BlockSpec((None, block_q), lambda b, n, i: (b, i)),
                  pl.BlockSpec((None, block_q), lambda b, n, i: (b, i)),
                  pl.BlockSpec((None, kv_len), lambda b, n, i: (b, 0)),
                  pl.BlockSpec((None, kv_len), lambda b, n, i: (b, 0))],
        out_specs=q_block, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="flash_attention_dq",
    )(kv_ranges, q, k, v, d_out, lse, delta, q_pos, q_seg, kv_pos, kv_seg)

    kv_block = pl.BlockSpec((None, block_k, None, head_dim), lambda b, h, j: (b, j, h, 0))
    q_group = pl.BlockSpec((None, q_len, group, head_dim), lambda b, h, j: (b, 0, h, 0))
    group_stats = pl.BlockSpec((None, group, q_len), lambda b, h, j: (b, h, 0))
    dk, dv = pl.pallas_call(
        jax.tree_util.Partial(_dkv_kernel, block_q=block_q, **statics),
        grid=(batch, num_kv_heads, kv_len // block_k),
        in_specs=[pl.BlockSpec((None, None, 2), lambda b, h, j: (b, j, 0)), q_group, kv_block, kv_block, q_group,
                  group_stats, group_stats, pl.BlockSpec((None, q_len), lambda b, h, j: (b, 0)),
                  pl.BlockSpec((None, q_len), lambda b, h, j: (b, 0)),
                  pl.BlockSpec((None, block_k), lambda b, h, j: (b, j)),
                  pl.BlockSpec((None, block_k), lambda b, h, j: (b, j))],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="flash_attention_dkv",
    )(q_ranges, q, k, v, d_out, lse, delta, q_pos, q_seg, kv_pos, kv_seg)
    return dq, dk, dv
