"""tools/bench_kernels.py at a tiny shape: every implementation runs and agrees with ours (jax.nn's
`dot_product_attention` with a local window included), ours agrees with a plain-numpy computation, and
the reported TFLOP/s are the counted work over the reported time; CPU timings themselves are meaningless
and unchecked."""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tools import bench_kernels


def numpy_attention(q, k, v, scale, window):
    """Causal grouped-query attention, query i seeing keys j with i - window < j <= i, in float64 numpy."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    seq, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
    group = heads // kv_heads
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    visible = (j <= i) & (i - j < (window or seq))
    out = np.zeros_like(q)
    for h in range(heads):
        scores = np.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, h // group]) * scale
        scores = np.where(visible, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bqk,bkd->bqd", probs, v[:, :, h // group])
    return out


def numpy_experts(x, experts, weights, gate, up, down):
    """Each token's top-k experts one by one: sum_k w_k * (silu(x W_gate) * (x W_up)) W_down, float64 numpy."""
    x, weights, gate, up, down = (np.asarray(a, np.float64) for a in (x, weights, gate, up, down))
    out = np.zeros_like(x)
    for n, (chosen, w) in enumerate(zip(np.asarray(experts), weights)):
        for e, we in zip(chosen, w):
            a = x[n] @ gate[e]
            out[n] += we * ((a / (1 + np.exp(-a))) * (x[n] @ up[e])) @ down[e]
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_attention_rows_agree(window):
    args = argparse.Namespace(
        seq=[40], batch=1, heads=4, kv_heads=2, head_dim=32, window=window, dtype="float32", iters=1)
    rows = bench_kernels.bench_attention(args, "cpu")
    assert [row["impl"] for row in rows] == ["pallas", "reference", "jax_xla"]
    assert rows[0]["max_abs_diff_vs_pallas"] == 0.0  # the baseline row: ours vs numpy is checked below
    i, j = np.arange(40)[:, None], np.arange(40)[None, :]
    pairs = int(((j <= i) & (i - j < (window or 40))).sum())
    for row in rows:
        assert row["max_abs_diff_vs_pallas"] < 1e-5, row
        assert row["forward_tflops"] == pytest.approx(4 * 1 * 4 * 32 * pairs / (row["forward_ms"] * 1e-3) / 1e12)
        assert row["forward_backward_tflops"] == pytest.approx(
            3.5 * 4 * 1 * 4 * 32 * pairs / (row["forward_backward_ms"] * 1e-3) / 1e12)


@pytest.mark.parametrize("window", [None, 5])
def test_benchmarked_attention_matches_numpy(window):
    """The baseline every attention row is compared with, against an independent float64 computation."""
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (2, 40, 4, 32))
    k, v = (jax.random.normal(key, (2, 40, 2, 32)) for key in keys[1:])
    positions = jnp.tile(jnp.arange(40, dtype=jnp.int32), (2, 1))
    ids = dict(q_positions=positions, kv_positions=positions, q_segment_ids=jnp.ones_like(positions),
               kv_segment_ids=jnp.ones_like(positions), scale=32 ** -0.5, sliding_window=window)
    expected = numpy_attention(q, k, v, 32 ** -0.5, window)
    for name, impl in bench_kernels.attention_impls(window, "cpu").items():
        np.testing.assert_allclose(np.asarray(impl(q, k, v, ids)), expected, atol=2e-5, err_msg=name)


def test_expert_rows_agree():
    args = argparse.Namespace(
        tokens=24, hidden=16, mlp=32, experts=4, top_k=2, no_dense=False, dtype="float32", iters=1)
    rows = bench_kernels.bench_experts(args)
    assert [row["impl"] for row in rows] == ["pallas", "ragged", "dense"]
    assert rows[0]["max_abs_diff_vs_pallas"] == 0.0  # the baseline row: ours vs numpy is checked below
    flops = 2 * 3 * 24 * 2 * 16 * 32  # gate, up and down matmuls of each token's 2 experts
    for row in rows:
        assert row["max_abs_diff_vs_pallas"] < 1e-5, row
        assert row["forward_tflops"] == pytest.approx(flops / (row["forward_ms"] * 1e-3) / 1e12)
        assert row["forward_backward_tflops"] == pytest.approx(3 * flops / (row["forward_backward_ms"] * 1e-3) / 1e12)


def test_benchmarked_experts_match_numpy():
    """The baseline every expert row is compared with (ours), against a per-token float64 loop."""
    keys = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(keys[0], (24, 16))
    gate, up = (16 ** -0.5 * jax.random.normal(key, (4, 16, 32)) for key in keys[1:3])
    down = 32 ** -0.5 * jax.random.normal(keys[3], (4, 32, 16))
    _, experts, weights = bench_kernels.route(jax.random.normal(keys[4], (24, 4)), 2)
    expected = numpy_experts(x, experts, weights, gate, up, down)
    for impl in (bench_kernels.pallas_experts, bench_kernels.ragged_experts, bench_kernels.dense_experts):
        got = impl(x, experts, weights, gate, up, down, jax.nn.silu)
        np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5, err_msg=impl.__name__)


def test_visible_pairs():
    assert bench_kernels.visible_pairs(4, None) == 10 and bench_kernels.visible_pairs(4, 2) == 7
