"""Grouped matmul for TPUs (Pallas, Mosaic lowering) over the tiled expert-sorted buffer (moe_routing).

The tile -> expert table arrives by scalar prefetch and drives the weight index map, so each row tile
streams only its expert's weight blocks. `tgmm` walks the tiles in order with the expert's gradient
block resident in VMEM: tiles of one expert are consecutive, so the block is zeroed when the expert
changes and written when it is about to change.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from maxdpo.kernels.tile_ops import matmul, matmul_nt, matmul_tn


def _gmm_kernel(tile_expert_ref, used_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, transpose_rhs):
    i, kk = pl.program_id(0), pl.program_id(2)
    product = matmul_nt if transpose_rhs else matmul

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(i < used_ref[0])
    def _accumulate():
        acc_ref[...] += product(lhs_ref[...], rhs_ref[...])

    @pl.when(kk == pl.num_programs(2) - 1)
    def _finish():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def gmm(lhs, rhs, dispatch, *, tile, block_k, block_n, transpose_rhs, interpret):
    """lhs [M, K] . rhs[e] ([E, K, N], or [E, N, K] when transposed) per tile -> [M, N]."""
    rows, depth = lhs.shape
    width = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if transpose_rhs:
        rhs_spec = pl.BlockSpec((None, block_n, block_k), lambda i, j, kk, te, used: (te[i], j, kk))
    else:
        rhs_spec = pl.BlockSpec((None, block_k, block_n), lambda i, j, kk, te, used: (te[i], kk, j))
    return pl.pallas_call(
        jax.tree_util.Partial(_gmm_kernel, transpose_rhs=transpose_rhs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(rows // tile, width // block_n, depth // block_k),
            in_specs=[pl.BlockSpec((tile, block_k), lambda i, j, kk, te, used: (i, kk)), rhs_spec],
            out_specs=pl.BlockSpec((tile, block_n), lambda i, j, kk, te, used: (i, j)),
            scratch_shapes=[pltpu.VMEM((tile, block_n), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((rows, width), lhs.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="grouped_matmul_tpu",
    )(dispatch.tile_expert, dispatch.used_tiles.reshape(1), lhs, rhs)


def _tgmm_kernel(tile_expert_ref, used_ref, lhs_ref, d_out_ref, out_ref, acc_ref):
    t, last = pl.program_id(2), pl.num_programs(2) - 1
    expert = tile_expert_ref[t]
    starts = (t == 0) | (expert != tile_expert_ref[jnp.maximum(t - 1, 0)])
    ends = (t == last) | (expert != tile_expert_ref[jnp.minimum(t + 1, last)])

    @pl.when(starts)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(t < used_ref[0])
    def _accumulate():
        acc_ref[...] += matmul_tn(lhs_ref[...], d_out_ref[...])

    @pl.when(ends)
    def _finish():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs, d_out, dispatch, *, num_experts, tile, block_k, block_n, interpret):
    """Weight gradient [E, K, N]: per expert, lhs[tiles]^T . d_out[tiles] (lhs [M, K], d_out [M, N])."""
    rows, depth = lhs.shape
    width = d_out.shape[1]
    return pl.pallas_call(
        _tgmm_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(depth // block_k, width // block_n, rows // tile),
            in_specs=[pl.BlockSpec((tile, block_k), lambda kk, j, t, te, used: (t, kk)),
                      pl.BlockSpec((tile, block_n), lambda kk, j, t, te, used: (t, j))],
            out_specs=pl.BlockSpec((None, block_k, block_n), lambda kk, j, t, te, used: (te[t], kk, j)),
            scratch_shapes=[pltpu.VMEM((block_k, block_n), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((num_experts, depth, width), lhs.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="grouped_matmul_weight_grad_tpu",
    )(dispatch.tile_expert, dispatch.used_tiles.reshape(1), lhs, d_out)
