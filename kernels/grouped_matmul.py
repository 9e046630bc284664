"""Grouped matmul over experts with a custom VJP, dispatching to the GPU or TPU kernels.

Forward: out = lhs . rhs[expert of the row's tile]. Backward: d_lhs is the same kernel against the
transposed weights (read transposed in place, never materialised), d_rhs the per-expert tgmm.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax

from maxdpo.kernels import grouped_matmul_gpu, grouped_matmul_tpu
from maxdpo.kernels.moe_routing import Dispatch
from maxdpo.kernels.platform import default_backend

BACKENDS = {"gpu": grouped_matmul_gpu, "tpu": grouped_matmul_tpu}


def default_tile(backend: Optional[str] = None) -> int:
    """Rows per tile: 128 on TPU (MXU height), 64 on GPU and in interpret mode."""
    return 128 if (backend or default_backend()[0]) == "tpu" else 64


def fit_block(dim: int, preferred: int) -> int:
    """Largest power of two <= preferred that divides dim (>= 16), else the whole dim."""
    block = preferred
    while block >= 16:
        if dim % block == 0:
            return block
        block //= 2
    return dim


class _Statics(NamedTuple):
    tile: int
    backend: str
    interpret: bool

    def blocks(self, depth: int, width: int) -> dict:
        preferred = 512 if self.backend == "tpu" else 64
        return dict(tile=self.tile, block_k=fit_block(depth, preferred), block_n=fit_block(width, 2 * preferred),
                    interpret=self.interpret)


def _gmm(statics: _Statics, lhs, rhs, dispatch, transpose_rhs: bool):
    width = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    return BACKENDS[statics.backend].gmm(lhs, rhs, dispatch, transpose_rhs=transpose_rhs,
                                         **statics.blocks(lhs.shape[1], width))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grouped_matmul(statics: _Statics, lhs, rhs, dispatch):
    return _gmm(statics, lhs, rhs, dispatch, transpose_rhs=False)


def _forward(statics, lhs, rhs, dispatch):
    return _grouped_matmul(statics, lhs, rhs, dispatch), (lhs, rhs, dispatch)


def _backward(statics, residuals, d_out):
    lhs, rhs, dispatch = residuals
    d_lhs = _gmm(statics, d_out, rhs, dispatch, transpose_rhs=True)  # [M, K]
    d_rhs = BACKENDS[statics.backend].tgmm(lhs, d_out, dispatch, num_experts=rhs.shape[0],
                                           **statics.blocks(lhs.shape[1], d_out.shape[1]))  # [E, K, N]
    return d_lhs, d_rhs, jax.tree.map(lambda _: None, dispatch)


_grouped_matmul.defvjp(_forward, _backward)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, dispatch: Dispatch, *, tile: int,
                   backend: Optional[str] = None, interpret: Optional[bool] = None) -> jax.Array:
    """lhs [M, K] (rows in `dispatch`'s tiled expert order), rhs [E, K, N] -> [M, N] in lhs's dtype."""
    if lhs.shape[0] % tile or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"grouped_matmul: lhs {lhs.shape} must have rows in whole tiles of {tile} and "
                         f"match rhs {rhs.shape}")
    auto_backend, auto_interpret = default_backend()
    statics = _Statics(tile, backend or auto_backend, auto_interpret if interpret is None else bool(interpret))
    return _grouped_matmul(statics, lhs, rhs.astype(lhs.dtype), dispatch)
