"""tools/bench_kernels.py at a tiny shape: every implementation runs and agrees with ours (jax.nn's
`dot_product_attention` with a local window included); CPU timings here are meaningless and unchecked."""
import argparse
import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).parents[1] / "tools" / "bench_kernels.py")
bench_kernels = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_kernels)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_rows_agree(window):
    args = argparse.Namespace(
        seq=[40], batch=1, heads=4, kv_heads=2, head_dim=32, window=window, dtype="float32", iters=1)
    rows = bench_kernels.bench_attention(args, "cpu")
    assert [row["impl"] for row in rows] == ["pallas", "reference", "jax_xla"]
    for row in rows:
        assert row["max_abs_diff_vs_pallas"] < 1e-5 and row["forward_tflops"] > 0, row


def test_expert_rows_agree():
    args = argparse.Namespace(
        tokens=24, hidden=16, mlp=32, experts=4, top_k=2, no_dense=False, dtype="float32", iters=1)
    rows = bench_kernels.bench_experts(args)
    assert [row["impl"] for row in rows] == ["pallas", "ragged", "dense"]
    for row in rows:
        assert row["max_abs_diff_vs_pallas"] < 1e-5 and row["forward_backward_tflops"] > 0, row


def test_visible_pairs():
    assert bench_kernels.visible_pairs(4, None) == 10 and bench_kernels.visible_pairs(4, 2) == 7
