"""MoE: the ragged (sorted tokens + ragged_dot) experts equal the dense reference in values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxdpo.models.layers import ACTIVATIONS
from maxdpo.models.moe import dense_experts, ragged_experts, route

NUM_EXPERTS, HIDDEN, MLP = 6, 16, 24


def _inputs(tokens, top_k, seed=0, favourite=None):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (tokens, HIDDEN))
    router = jax.random.normal(keys[1], (HIDDEN, NUM_EXPERTS))
    if favourite is not None:  # one expert wins every token's first choice
        x = x.at[:, 0].set(1.0)
        router = router.at[0, favourite].add(100.0)
    gate, up = (0.3 * jax.random.normal(k, (NUM_EXPERTS, HIDDEN, MLP)) for k in keys[2:4])
    down = 0.3 * jax.random.normal(keys[4], (NUM_EXPERTS, MLP, HIDDEN))
    target = jax.random.normal(keys[5], (tokens, HIDDEN))
    return x, router, gate, up, down, target


def _loss(impl, top_k):
    def loss(x, router, gate, up, down, target):
        _, experts, weights = route(x @ router, top_k)
        out = impl(x, experts, weights, gate, up, down, ACTIVATIONS["silu"])
        return jnp.sum(out * target), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)


@pytest.mark.parametrize("tokens,top_k,favourite", [(37, 2, None), (64, 1, None), (13, 3, None), (40, 2, 4),
                                                    (5, 2, None)])
def test_ragged_equals_dense(tokens, top_k, favourite):
    inputs = _inputs(tokens, top_k, favourite=favourite)
    if favourite is not None:
        _, experts, _ = route(inputs[0] @ inputs[1], top_k)
        assert np.all(np.asarray(experts[:, 0]) == favourite)
    (_, dense_out), dense_grads = _loss(dense_experts, top_k)(*inputs)
    (_, ragged_out), ragged_grads = _loss(ragged_experts, top_k)(*inputs)
    np.testing.assert_allclose(ragged_out, dense_out, atol=1e-5, rtol=1e-5)
    for name, ragged, dense in zip(("x", "router", "gate", "up", "down"), ragged_grads, dense_grads):
        np.testing.assert_allclose(ragged, dense, atol=1e-4, rtol=1e-4, err_msg=name)


def test_each_token_uses_only_its_top_k_experts():
    """Zeroing an expert that a token did not choose leaves that token's output unchanged."""
    x, router, gate, up, down, _ = _inputs(30, 2)
    _, experts, weights = route(x @ router, 2)
    out = ragged_experts(x, experts, weights, gate, up, down, ACTIVATIONS["silu"])
    unused = 0
    mask = ~np.any(np.asarray(experts) == unused, axis=1)
    out_without = ragged_experts(x, experts, weights, gate.at[unused].set(0), up, down, ACTIVATIONS["silu"])
    np.testing.assert_allclose(out_without[mask], out[mask], atol=1e-6)
    assert not np.allclose(out_without[~mask], out[~mask])
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
