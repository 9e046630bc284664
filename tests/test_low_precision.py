"""bf16 parameters and Adam moments with stochastic rounding: each rounding is unbiased and lands on a bf16
neighbour, and many small AdamW steps move bf16 weights as fp32 ones do, where rounding to nearest stalls."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from maxdpo.config import OptimizerConfig
from maxdpo.dpo import low_precision
from maxdpo.dpo.optim import make_optimizer


def _neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bf16 values just below and above each fp32 value (by magnitude, truncating toward zero first)."""
    bits = x.view(np.uint32)
    down = (bits & np.uint32(0xFFFF0000)).view(np.float32)
    up = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    return down, up


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = np.random.default_rng(0).normal(scale=0.02, size=256).astype(np.float32)
    keys = jax.random.split(jax.random.key(1), 4000)
    rounded = np.asarray(jax.vmap(lambda k: low_precision.stochastic_round(jnp.asarray(x), k, jnp.bfloat16))(keys),
                         np.float32)  # [draws, 256]
    down, up = _neighbours(x)
    assert np.all((rounded == down) | (rounded == up))
    ulp = np.abs(up - down)
    # the mean of 4000 draws is within 5 standard errors (sd <= ulp / 2) of x
    assert np.all(np.abs(rounded.mean(0) - x) <= 5 * 0.5 * ulp / np.sqrt(len(keys)))
    exact = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(low_precision.stochastic_round(jnp.asarray(exact), keys[0], jnp.bfloat16),
                                  exact.astype(jnp.bfloat16))  # representable values never move


def _train(param_dtype, moment_dtype, rounding, steps=300, lr=1e-5):
    """AdamW on fixed gradients with a steady direction plus noise (as a pull towards an optimum looks to the
    optimizer); returns the total change of the weights in fp32."""
    rng = np.random.default_rng(0)
    start = np.asarray(jnp.asarray(rng.normal(scale=0.02, size=(64, 64)), jnp.bfloat16), np.float32)
    pull = np.sign(rng.normal(size=start.shape)) * rng.uniform(0.5, 1.0, start.shape)
    noise = jax.random.normal(jax.random.key(2), (steps,) + start.shape)
    cfg = OptimizerConfig(learning_rate=lr, schedule="constant", max_grad_norm=0.0, moment_dtype=moment_dtype)
    tx, _ = make_optimizer(cfg, steps, param_dtype)
    params = {"kernel": jnp.asarray(start, param_dtype)}
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        grads = {"kernel": (pull + 0.5 * noise[i]).astype(jnp.float32)}
        updates, state = tx.update(grads, state, params)
        return rounding(params, updates, i), state

    for i in range(steps):
        params, state = step(params, state, i)
    assert params["kernel"].dtype == param_dtype
    assert all(m.dtype == jnp.dtype(moment_dtype) for m in (state[1][0].mu["kernel"], state[1][0].nu["kernel"]))
    return np.asarray(params["kernel"], np.float32) - start


def test_bf16_weights_and_moments_follow_fp32_where_rounding_to_nearest_stalls():
    exact = _train(jnp.float32, "float32", low_precision.apply_updates)
    moments_only = _train(jnp.float32, "bfloat16", low_precision.apply_updates)
    stochastic = _train(jnp.bfloat16, "bfloat16", low_precision.apply_updates)
    nearest = _train(jnp.bfloat16, "bfloat16", lambda p, u, i: optax.apply_updates(p, u))
    relative = lambda delta: np.linalg.norm(delta - exact) / np.linalg.norm(exact)  # noqa: E731
    # each weight moved ~2.5e-3 in 300 steps of ~0.1 bf16 ulp each (measured: 0.005, 0.18, 0.94)
    assert np.abs(exact).mean() > 2e-3
    assert relative(moments_only) < 0.02, relative(moments_only)
    # the weights' rounding is a random walk of 300 steps of at most half an ulp: per weight ~20% of its move,
    # unbiased over the 4096 weights
    assert relative(stochastic) < 0.25, relative(stochastic)
    assert abs(np.mean(stochastic / exact) - 1) < 0.01
    assert relative(nearest) > 0.9, relative(nearest)  # nearly every update rounded away
