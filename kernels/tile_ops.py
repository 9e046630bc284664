"""Tile matmuls shared by the kernels: fp32 accumulation, precision fixed by operand dtype.

bf16 operands run at the MXU/tensor-core's native precision and fp32 operands at full precision, whatever
`jax_default_matmul_precision` says (Mosaic rejects fp32 contract precision on bf16 operands).
"""
import jax
import jax.numpy as jnp

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def _dot(a: jax.Array, b: jax.Array, dimensions) -> jax.Array:
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(a, b, dimensions, precision=precision, preferred_element_type=jnp.float32)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] . b [k, n] -> [m, n] fp32."""
    return _dot(a, b, _NN)


def matmul_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] . b [n, k]^T -> [m, n] fp32."""
    return _dot(a, b, _NT)


def matmul_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [k, m]^T . b [k, n] -> [m, n] fp32."""
    return _dot(a, b, _TN)
