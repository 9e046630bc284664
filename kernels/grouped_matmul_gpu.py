"""Grouped matmul for GPUs (Pallas, Triton lowering) over the tiled expert-sorted buffer (moe_routing).

`gmm`: one program per (row tile, output column block) multiplies by its tile's expert weights, read
by one scalar; padding tiles past the used ones do no work. `tgmm` (the weight gradient): one program
per (expert, weight block) sums lhs^T . d_out over that expert's tiles only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from maxdpo.kernels.tile_ops import matmul, matmul_nt, matmul_tn

PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=3)


def _gmm_kernel(tile_expert_ref, used_ref, lhs_ref, rhs_ref, out_ref, *, block_k, transpose_rhs):
    i = pl.program_id(0)
    expert = tile_expert_ref[i]
    product = matmul_nt if transpose_rhs else matmul

    def step(kk, acc):
        ks = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
        weights = rhs_ref[expert, :, ks] if transpose_rhs else rhs_ref[expert, ks, :]
        return acc + product(lhs_ref[:, ks], weights)

    # int32 bounds (a bound made of Python ints by jnp.where would be i1 to Triton's scf.for)
    steps = (i < used_ref[0]).astype(jnp.int32) * (lhs_ref.shape[1] // block_k)
    acc = jax.lax.fori_loop(jnp.int32(0), steps, step, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def gmm(lhs, rhs, dispatch, *, tile, block_k, block_n, transpose_rhs, interpret):
    """lhs [M, K] . rhs[e] ([E, K, N], or [E, N, K] when transposed) per tile -> [M, N]."""
    tile_expert, used_tiles = dispatch.tile_expert, dispatch.used_tiles
    rows, depth = lhs.shape
    experts, width = rhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]
    rhs_spec = (pl.BlockSpec((experts, block_n, depth), lambda i, j: (0, j, 0)) if transpose_rhs
                else pl.BlockSpec((experts, depth, block_n), lambda i, j: (0, 0, j)))
    return pl.pallas_call(
        jax.tree_util.Partial(_gmm_kernel, block_k=block_k, transpose_rhs=transpose_rhs),
        grid=(rows // tile, width // block_n),
        in_specs=[pl.BlockSpec(tile_expert.shape, lambda i, j: (0,)), pl.BlockSpec((1,), lambda i, j: (0,)),
                  pl.BlockSpec((tile, depth), lambda i, j: (i, 0)), rhs_spec],
        out_specs=pl.BlockSpec((tile, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((rows, width), lhs.dtype),
        compiler_params=PARAMS, interpret=interpret, name="grouped_matmul",
    )(tile_expert, used_tiles.reshape(1), lhs, rhs)


def _tgmm_kernel(expert_tiles_ref, lhs_ref, d_out_ref, out_ref, *, tile):
    expert = pl.program_id(0)

    def step(t, acc):
        rows = pl.ds(pl.multiple_of(t * tile, tile), tile)
        return acc + matmul_tn(lhs_ref[rows, :], d_out_ref[rows, :])

    acc = jax.lax.fori_loop(expert_tiles_ref[expert, 0], expert_tiles_ref[expert, 1], step,
                            jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs, d_out, dispatch, *, num_experts, tile, block_k, block_n, interpret):
    """Weight gradient [E, K, N]: per expert, lhs[tiles]^T . d_out[tiles] (lhs [M, K], d_out [M, N])."""
    expert_tiles = dispatch.expert_tiles
    rows, depth = lhs.shape
    width = d_out.shape[1]
    return pl.pallas_call(
        jax.tree_util.Partial(_tgmm_kernel, tile=tile), grid=(num_experts, depth // block_k, width // block_n),
        in_specs=[pl.BlockSpec(expert_tiles.shape, lambda e, kk, j: (0, 0)),
                  pl.BlockSpec((rows, block_k), lambda e, kk, j: (0, kk)),
                  pl.BlockSpec((rows, block_n), lambda e, kk, j: (0, j))],
        out_specs=pl.BlockSpec((None, block_k, block_n), lambda e, kk, j: (e, kk, j)),
        out_shape=jax.ShapeDtypeStruct((num_experts, depth, width), lhs.dtype),
        compiler_params=PARAMS, interpret=interpret, name="grouped_matmul_weight_grad",
    )(expert_tiles, lhs, d_out)
