"""Whole models with `attention: pallas` / `moe_impl: pallas` give the XLA path's loss and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import maxdpo
from hf_models import tiny_hf


def _loss_and_grads(path, ids, mask, targets, **runtime):
    graphdef, state = nnx.split(maxdpo.load_pretrained(path, **runtime))
    params = nnx.to_pure_dict(state)

    def loss(params):
        model = nnx.merge(graphdef, params)
        logits, aux = model.forward(ids, attention_mask=mask)
        logps = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
        return -jnp.sum(logps * mask) / jnp.sum(mask) + 0.01 * aux

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("family,runtime", [
    ("llama", dict(attention="pallas")),
    ("mistral", dict(attention="pallas")),  # sliding window 7
    ("gemma2", dict(attention="pallas")),  # soft-cap, alternating windows, head_dim 24 (padded in the kernel)
    ("mixtral", dict(attention="pallas", moe_impl="pallas")),
])
def test_pallas_model_matches_xla(tmp_path, family, runtime):
    tiny_hf(tmp_path, family)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 97, (2, 29)), jnp.int32)
    targets = jnp.asarray(rng.integers(3, 97, (2, 29)), jnp.int32)
    mask = jnp.ones((2, 29), jnp.int32).at[1, 21:].set(0)  # right padding in row 1
    want_loss, want_grads = _loss_and_grads(tmp_path, ids, mask, targets)
    got_loss, got_grads = _loss_and_grads(tmp_path, ids, mask, targets, **runtime)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    for path, got in jax.tree_util.tree_leaves_with_path(got_grads):
        want = flat_want[path]
        scale = float(jnp.max(jnp.abs(want))) + 1e-12
        assert float(jnp.max(jnp.abs(got - want))) <= 2e-4 * scale, jax.tree_util.keystr(path)
