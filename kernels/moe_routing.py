"""MoE dispatch for the grouped matmul: token copies sorted by expert into whole row tiles, and back.

Each expert's copies start on a fresh tile of `tile` rows, so every tile belongs to exactly one expert
and the kernels index that expert's weights with one scalar. Every expert gets at least one tile (an
empty expert's tile is all padding), which lets the weight-gradient kernel write each expert's block.
Dropless: the static row budget ceil(N*k / tile) + E tiles covers any routing, including all copies
on one expert. One fused pass: a stable sort, cumulative sums and two gathers.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Dispatch(NamedTuple):
    """Where each token copy lives in the tiled, expert-sorted buffer.

    row_of_copy [N*k]: buffer row of copy (token * k + slot); copy_of_row [M]: the copy in each row or
    -1 for padding; tile_expert [M / tile]; expert_tiles [E, 2]: each expert's [first, end) tile range;
    used_tiles []: tiles holding any expert (the rest of the budget is padding).
    """
    row_of_copy: jax.Array
    copy_of_row: jax.Array
    tile_expert: jax.Array
    expert_tiles: jax.Array
    used_tiles: jax.Array


def num_tiles(num_copies: int, num_experts: int, tile: int) -> int:
    """Static tile budget for any routing of `num_copies` token copies."""
    return -(-num_copies // tile) + num_experts


def plan(experts: jax.Array, num_experts: int, tile: int) -> Dispatch:
    """experts [N, k] int -> Dispatch over a buffer of num_tiles(N*k, E, tile) * tile rows."""
    flat = experts.reshape(-1).astype(jnp.int32)  # [C], C = N*k
    copies = flat.shape[0]
    budget = num_tiles(copies, num_experts, tile)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]
    group_start = jnp.cumsum(sizes) - sizes  # [E], first sorted index of each expert
    tiles = jnp.maximum(-(-sizes // tile), 1)  # [E]
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    order = jnp.argsort(flat, stable=True)  # [C], sorted index -> copy
    rank = jnp.zeros((copies,), jnp.int32).at[order].set(jnp.arange(copies, dtype=jnp.int32))  # copy -> sorted
    row_of_copy = tile_start[flat] * tile + rank - group_start[flat]  # [C]
    copy_of_row = jnp.full((budget * tile,), -1, jnp.int32).at[row_of_copy].set(jnp.arange(copies, dtype=jnp.int32))
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(budget), side="right"), num_experts - 1)
    return Dispatch(row_of_copy, copy_of_row, tile_expert.astype(jnp.int32),
                    jnp.stack([tile_start, tile_end], axis=-1).astype(jnp.int32), tile_end[-1])


def permute(x: jax.Array, dispatch: Dispatch, top_k: int) -> jax.Array:
    """x [N, D] -> [M, D]: each row the token of its copy, padding rows zero."""
    copy = dispatch.copy_of_row
    return jnp.where((copy >= 0)[:, None], x[jnp.maximum(copy, 0) // top_k], 0).astype(x.dtype)


def combine(y: jax.Array, dispatch: Dispatch, weights: jax.Array) -> jax.Array:
    """y [M, D] -> [N, D]: each token's k expert outputs summed with their router weights [N, k]."""
    num_tokens, top_k = weights.shape
    per_copy = y[dispatch.row_of_copy].reshape(num_tokens, top_k, -1)  # [N, k, D]
    return jnp.einsum("NKD,NK->ND", per_copy, weights.astype(y.dtype))
