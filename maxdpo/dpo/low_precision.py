"""Parameters and Adam moments stored in bf16 with stochastic rounding; the arithmetic stays fp32.

Rounding to nearest would stall training: with b2 = 0.999 a second moment moves by 0.1% per step, under
bf16's 0.4% resolution, and a learning rate of 5e-7 moves a weight by far less than one bf16 ulp, so both
round back to the old value every step. Stochastic rounding keeps each stored value unbiased
(E[round(x)] = x), so small updates accumulate on average. The random bits come from the step count, so a
resumed run rounds exactly as the uninterrupted one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Streams of rounding bits, folded into each step's key.
_FIRST_MOMENT, _SECOND_MOMENT, _PARAMS = 0, 1, 2


def stochastic_round(x: jax.Array, key: jax.Array, dtype) -> jax.Array:
    """`x` in `dtype`; into bf16 rounded down or up with probabilities by distance (uniform random bits added
    below bf16's 16 kept bits of the fp32 pattern, then truncated). Other dtypes: an ordinary cast."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return x.astype(dtype)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    kept = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(kept, jnp.float32).astype(jnp.bfloat16)


def _round_tree(tree, key: jax.Array, dtypes):
    """Each leaf of `tree` stochastically rounded to the matching dtype of the tree `dtypes`."""
    leaves, treedef = jax.tree.flatten(tree)
    dtype_leaves = treedef.flatten_up_to(dtypes)
    rounded = [stochastic_round(leaf, jax.random.fold_in(key, i), dtype)
               for i, (leaf, dtype) in enumerate(zip(leaves, dtype_leaves))]
    return jax.tree.unflatten(treedef, rounded)


def _step_key(count: jax.Array, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(0), stream), count)


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype) -> optax.GradientTransformation:
    """optax.scale_by_adam's update computed in fp32, with both moments stored in `moment_dtype` (bf16:
    stochastically rounded). Its state is an `optax.ScaleByAdamState`, like optax's."""
    moment_dtype = jnp.dtype(moment_dtype)

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, moment_dtype), params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update(grads, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)  # noqa: E731
        grads, mu, nu = f32(grads), f32(state.mu), f32(state.nu)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, nu, grads)
        step = count.astype(jnp.float32)
        updates = jax.tree.map(lambda m, v: (m / (1 - b1 ** step)) / (jnp.sqrt(v / (1 - b2 ** step)) + eps), mu, nu)
        dtypes = jax.tree.map(lambda _: moment_dtype, mu)
        stored = optax.ScaleByAdamState(count, _round_tree(mu, _step_key(count, _FIRST_MOMENT), dtypes),
                                        _round_tree(nu, _step_key(count, _SECOND_MOMENT), dtypes))
        return updates, stored

    return optax.GradientTransformation(init, update)


def apply_updates(params, updates, step: jax.Array):
    """params + updates, added in fp32 and stored in each parameter's dtype: bf16 parameters stochastically
    rounded (bits from `step`), fp32 ones exactly as `optax.apply_updates`."""
    summed = jax.tree.map(lambda p, u: p.astype(jnp.float32) + u.astype(jnp.float32), params, updates)
    return _round_tree(summed, _step_key(step, _PARAMS), jax.tree.map(lambda p: p.dtype, params))
