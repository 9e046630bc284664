"""MoE: the ragged (ragged_dot) and Pallas (tile dispatch + grouped matmul, GPU and TPU kernels in interpret
mode) experts equal the dense reference in values and gradients; the dispatch plan and the kernels alone."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxdpo.models.layers import ACTIVATIONS
from jax import export

from maxdpo.kernels import moe_routing
from maxdpo.kernels.grouped_matmul import grouped_matmul
from maxdpo.models.moe import ExpertAdapters, dense_experts, pallas_experts, ragged_experts, route

NUM_EXPERTS, HIDDEN, MLP = 6, 16, 24
IMPLEMENTATIONS = {
    "ragged": ragged_experts,
    "pallas_gpu": functools.partial(pallas_experts, backend="gpu", interpret=True, tile=8),
    "pallas_tpu": functools.partial(pallas_experts, backend="tpu", interpret=True, tile=8),
}


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


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("tokens,top_k,favourite", [(37, 2, None), (64, 1, None), (13, 3, None), (40, 2, 4),
                                                    (5, 2, None)])
def test_sparse_equals_dense(impl, tokens, top_k, favourite):
    inputs = _inputs(tokens, top_k, favourite=favourite)
    if favourite is not None:
        _, experts, _ = route(inputs[0] @ inputs[1], top_k)
        assert np.all(np.asarray(experts[:, 0]) == favourite)
    (_, dense_out), dense_grads = _loss(dense_experts, top_k)(*inputs)
    (_, sparse_out), sparse_grads = _loss(IMPLEMENTATIONS[impl], top_k)(*inputs)
    np.testing.assert_allclose(sparse_out, dense_out, atol=1e-5, rtol=1e-5)
    for name, sparse, dense in zip(("x", "router", "gate", "up", "down"), sparse_grads, dense_grads):
        np.testing.assert_allclose(sparse, dense, atol=1e-4, rtol=1e-4, err_msg=name)


def _adapters(parts: str, rank: int = 3, seed: int = 1) -> ExpertAdapters:
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = {"gate_up_a": (NUM_EXPERTS, HIDDEN, rank), "gate_up_b": (NUM_EXPERTS, rank, 2, MLP),
              "down_a": (NUM_EXPERTS, MLP, rank), "down_b": (NUM_EXPERTS, rank, HIDDEN)}
    return ExpertAdapters(**{name: 0.3 * jax.random.normal(key, shape) for key, (name, shape)
                             in zip(keys, shapes.items()) if name.startswith(parts) or parts == "both"})


@pytest.mark.parametrize("impl", ["dense", *IMPLEMENTATIONS])
@pytest.mark.parametrize("parts", ["both", "gate_up", "down"])
def test_expert_adapters_equal_experts_with_the_adapters_merged(impl, parts):
    """LoRA through each implementation's grouped products (rank r, never forming W + A B) = the dense experts
    with W + A B merged; so are the gradients of x and of every A and B."""
    x, router, gate, up, down, target = _inputs(37, 2)
    _, experts, weights = route(x @ router, 2)
    expert_fn = {"dense": dense_experts, **IMPLEMENTATIONS}[impl]

    def through_adapters(x, adapters):
        return jnp.sum(expert_fn(x, experts, weights, gate, up, down, ACTIVATIONS["silu"], adapters) * target)

    def merged(x, adapters):
        g, u, d = gate, up, down
        if adapters.gate_up_a is not None:
            g = g + jnp.einsum("EDR,ERF->EDF", adapters.gate_up_a, adapters.gate_up_b[:, :, 0])
            u = u + jnp.einsum("EDR,ERF->EDF", adapters.gate_up_a, adapters.gate_up_b[:, :, 1])
        if adapters.down_a is not None:
            d = d + jnp.einsum("EFR,ERD->EFD", adapters.down_a, adapters.down_b)
        return jnp.sum(dense_experts(x, experts, weights, g, u, d, ACTIVATIONS["silu"]) * target)

    adapters = _adapters(parts)
    got, got_grads = jax.value_and_grad(through_adapters, argnums=(0, 1))(x, adapters)
    want, want_grads = jax.value_and_grad(merged, argnums=(0, 1))(x, adapters)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


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


@pytest.mark.parametrize("experts", [[[2, 0], [2, 5], [0, 2]], [[3, 1]] * 7, [[4]] * 20])
def test_dispatch_plan(experts):
    """Every copy sits in a tile of its own expert, in token order within the expert; every expert owns
    at least one tile; padding rows hold no copy; rows fit the static budget (all-to-one-expert included)."""
    experts = jnp.asarray(experts, jnp.int32)
    tile = 4
    plan = moe_routing.plan(experts, NUM_EXPERTS, tile)
    flat = np.asarray(experts).reshape(-1)
    rows = np.asarray(plan.row_of_copy)
    tile_expert = np.asarray(plan.tile_expert)
    assert len(plan.copy_of_row) == moe_routing.num_tiles(flat.size, NUM_EXPERTS, tile) * tile
    np.testing.assert_array_equal(tile_expert[rows // tile], flat)
    np.testing.assert_array_equal(np.asarray(plan.copy_of_row)[rows], np.arange(flat.size))
    assert int(np.sum(np.asarray(plan.copy_of_row) >= 0)) == flat.size
    for expert in range(NUM_EXPERTS):
        first, end = np.asarray(plan.expert_tiles)[expert]
        assert end > first and np.all(tile_expert[first:end] == expert)
        assert np.all(np.diff(rows[flat == expert]) == 1)
    assert np.all(np.diff(tile_expert) >= 0) and int(plan.used_tiles) == np.asarray(plan.expert_tiles)[-1, 1]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_grouped_matmul_equals_ragged_dot(backend):
    """On expert-sorted rows (padding removed) the kernel is `jax.lax.ragged_dot`, values and gradients."""
    keys = jax.random.split(jax.random.key(3), 4)
    experts = jax.random.randint(keys[0], (45, 2), 0, NUM_EXPERTS).at[:30, 0].set(1)  # uneven groups
    plan = moe_routing.plan(experts, NUM_EXPERTS, 8)
    x = jax.random.normal(keys[1], (45 * 2, HIDDEN))  # one row per copy
    rhs = jax.random.normal(keys[2], (NUM_EXPERTS, HIDDEN, MLP))
    d_out = jax.random.normal(keys[3], (45 * 2, MLP))
    order = jnp.argsort(experts.reshape(-1), stable=True)
    sizes = jnp.bincount(experts.reshape(-1), length=NUM_EXPERTS).astype(jnp.int32)

    def kernel(x, rhs):
        tiled = jnp.zeros((plan.copy_of_row.shape[0], HIDDEN)).at[plan.row_of_copy].set(x)
        out = grouped_matmul(tiled, rhs, plan, tile=8, backend=backend, interpret=True)
        return out[plan.row_of_copy]

    def reference(x, rhs):
        out = jax.lax.ragged_dot(x[order], rhs, sizes)
        return jnp.zeros_like(out).at[order].set(out)

    got, got_vjp = jax.vjp(kernel, x, rhs)
    want, want_vjp = jax.vjp(reference, x, rhs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for name, g, w in zip(("lhs", "rhs"), got_vjp(d_out), want_vjp(d_out)):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_pallas_bfloat16_error_is_that_of_bfloat16_reference(backend):
    """bf16: the kernel's error against fp32 dense is at most 1.5x bf16 dense's own error (+1e-3)."""
    x, router, gate, up, down, target = _inputs(48, 2, seed=1)
    _, experts, weights = route(x @ router, 2)
    bf16 = [a.astype(jnp.bfloat16) for a in (x, gate, up, down)]

    def output(impl, x, gate, up, down):
        return impl(x, experts, weights, gate, up, down, ACTIVATIONS["silu"]).astype(jnp.float32)

    exact = output(dense_experts, *(a.astype(jnp.float32) for a in bf16))
    kernel_error = jnp.max(jnp.abs(output(IMPLEMENTATIONS[f"pallas_{backend}"], *bf16) - exact))
    reference_error = jnp.max(jnp.abs(output(dense_experts, *bf16) - exact))
    assert float(kernel_error) <= 1.5 * float(reference_error) + 1e-3, (kernel_error, reference_error)


def test_gpu_grouped_matmul_lowers_to_triton_at_mixtral_shape():
    """Mixtral-like experts (8, top-2, 4096 x 14336), bf16, forward + backward lower to Triton kernels."""
    def loss(x, gate, down, experts):
        out = pallas_experts(x, experts, jnp.full(experts.shape, 0.5), gate, gate, down, jax.nn.silu,
                             backend="gpu", interpret=False)
        return jnp.sum(out.astype(jnp.float32) ** 2)
    shape = jax.ShapeDtypeStruct
    exported = export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(shape((4096, 4096), jnp.bfloat16), shape((8, 4096, 14336), jnp.bfloat16),
      shape((8, 14336, 4096), jnp.bfloat16), shape((4096, 2), jnp.int32))
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") >= 8  # 3 forward, 3 d_lhs, >= 2 d_rhs
