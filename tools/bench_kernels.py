"""Times the Pallas kernels against their references and JAX's built-ins, forward and forward+backward.

    python tools/bench_kernels.py                       # Llama-3 attention (seq 2k-8k) + Mixtral experts
    python tools/bench_kernels.py --what attention --seq 4096 --window 1024 --json out.json

Attention: ours (`pallas`), the plain-JAX reference (`reference`), `jax.nn.dot_product_attention` with
implementation `xla` and (GPU) `cudnn`. Experts: ours (`pallas`), `jax.lax.ragged_dot` (`ragged`), the
dense reference (`dense`, k/E useful work). Each line: median milliseconds over --iters after warm-up,
TFLOP/s of useful work (attention counts only visible query-key pairs; backward = 2.5x forward), and
the largest difference from the reference's output. Without a GPU or TPU the Pallas kernels only run in
interpret mode, where time means nothing: the tool then checks values at a small shape and times nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from maxdpo.kernels.attention_reference import attention_reference
from maxdpo.kernels.flash_attention import flash_attention
from maxdpo.models.moe import dense_experts, pallas_experts, ragged_experts, route


def median_ms(fn, args, iters: int) -> float:
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def visible_pairs(seq: int, window) -> int:
    """Causal query-key pairs inside the window (the work attention has to do)."""
    reach = np.minimum(np.arange(1, seq + 1), window or seq)
    return int(reach.sum())


def attention_impls(window, platform: str) -> dict:
    def ours(q, k, v, ids):
        return flash_attention(q, k, v, **ids)

    def reference(q, k, v, ids):
        return attention_reference(q, k, v, **ids)

    def builtin(implementation):
        def run(q, k, v, ids):
            return jax.nn.dot_product_attention(q, k, v, scale=ids["scale"], is_causal=True,
                                                local_window_size=None if window is None else (window - 1, 0),
                                                implementation=implementation)
        return run

    impls = {"pallas": ours, "reference": reference, "jax_xla": builtin("xla")}
    if platform == "gpu":
        impls["jax_cudnn"] = builtin("cudnn")
    return impls


def bench_attention(args, platform: str) -> list[dict]:
    rows = []
    for seq in args.seq:
        keys = jax.random.split(jax.random.key(0), 3)
        dtype = jnp.dtype(args.dtype)
        q = jax.random.normal(keys[0], (args.batch, seq, args.heads, args.head_dim), dtype)
        k, v = (jax.random.normal(key, (args.batch, seq, args.kv_heads, args.head_dim), dtype) for key in keys[1:])
        positions = jnp.tile(jnp.arange(seq, dtype=jnp.int32), (args.batch, 1))
        ids = dict(q_positions=positions, kv_positions=positions, q_segment_ids=jnp.ones_like(positions),
                   kv_segment_ids=jnp.ones_like(positions), scale=args.head_dim ** -0.5, sliding_window=args.window)
        flops = 4 * args.batch * args.heads * args.head_dim * visible_pairs(seq, args.window)
        expected = None
        for name, impl in attention_impls(args.window, platform).items():
            forward = jax.jit(lambda q, k, v, impl=impl: impl(q, k, v, ids))
            loss = lambda q, k, v, impl=impl: jnp.sum(impl(q, k, v, ids).astype(jnp.float32) ** 2)  # noqa: E731
            both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            try:
                out = forward(q, k, v).astype(jnp.float32)
                row = dict(kernel="attention", impl=name, seq=seq, forward_ms=median_ms(forward, (q, k, v), args.iters),
                           forward_backward_ms=median_ms(both, (q, k, v), args.iters))
            except Exception as error:  # e.g. cuDNN refusing a shape: report it, keep benchmarking
                rows.append(dict(kernel="attention", impl=name, seq=seq, error=f"{type(error).__name__}: {error}"[:300]))
                continue
            expected = out if expected is None else expected
            row.update(forward_tflops=flops / row["forward_ms"] / 1e9,
                       forward_backward_tflops=3.5 * flops / row["forward_backward_ms"] / 1e9,
                       max_abs_diff_vs_pallas=float(jnp.max(jnp.abs(out - expected))))
            rows.append(row)
    return rows


def bench_experts(args) -> list[dict]:
    keys = jax.random.split(jax.random.key(1), 5)
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(keys[0], (args.tokens, args.hidden), dtype)
    scale = args.hidden ** -0.5
    gate, up = (scale * jax.random.normal(key, (args.experts, args.hidden, args.mlp), dtype) for key in keys[1:3])
    down = args.mlp ** -0.5 * jax.random.normal(keys[3], (args.experts, args.mlp, args.hidden), dtype)
    _, experts, weights = route(jax.random.normal(keys[4], (args.tokens, args.experts)), args.top_k)
    flops = 2 * 3 * args.tokens * args.top_k * args.hidden * args.mlp
    impls = {"pallas": pallas_experts, "ragged": ragged_experts}
    if not args.no_dense:
        impls["dense"] = dense_experts
    rows, expected = [], None
    for name, impl in impls.items():
        def apply(x, gate, up, down, impl=impl):
            return impl(x, experts, weights, gate, up, down, jax.nn.silu)
        forward = jax.jit(apply)
        loss = lambda *a, apply=apply: jnp.sum(apply(*a).astype(jnp.float32) ** 2)  # noqa: E731
        both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        operands = (x, gate, up, down)
        out = forward(*operands).astype(jnp.float32)
        expected = out if expected is None else expected
        row = dict(kernel="experts", impl=name, tokens=args.tokens, forward_ms=median_ms(forward, operands, args.iters),
                   forward_backward_ms=median_ms(both, operands, args.iters),
                   max_abs_diff_vs_pallas=float(jnp.max(jnp.abs(out - expected))))
        row.update(forward_tflops=flops / row["forward_ms"] / 1e9,
                   forward_backward_tflops=3 * flops / row["forward_backward_ms"] / 1e9)
        rows.append(row)
    return rows


def check_without_accelerator() -> list[dict]:
    """Interpret-mode values at a small shape (what a CPU can say about the kernels)."""
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (2, 96, 4, 64))
    k, v = (jax.random.normal(key, (2, 96, 2, 64)) for key in keys[1:])
    positions = jnp.tile(jnp.arange(96, dtype=jnp.int32), (2, 1))
    ids = dict(q_positions=positions, kv_positions=positions, q_segment_ids=jnp.ones_like(positions),
               kv_segment_ids=jnp.ones_like(positions), scale=0.125, sliding_window=40)
    attention_error = jnp.max(jnp.abs(flash_attention(q, k, v, **ids) - attention_reference(q, k, v, **ids)))
    x = jax.random.normal(keys[0], (96, 64))
    gate, up = jax.random.normal(keys[1], (2, 8, 64, 128)) * 0.1
    down = jnp.swapaxes(gate, 1, 2)
    _, experts, weights = route(x @ jax.random.normal(keys[2], (64, 8)), 2)
    expert_error = jnp.max(jnp.abs(pallas_experts(x, experts, weights, gate, up, down, jax.nn.silu)
                                   - dense_experts(x, experts, weights, gate, up, down, jax.nn.silu)))
    return [dict(kernel="attention", impl="pallas (interpret)", max_abs_diff_vs_reference=float(attention_error)),
            dict(kernel="experts", impl="pallas (interpret)", max_abs_diff_vs_reference=float(expert_error))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", nargs="+", default=["attention", "experts"], choices=["attention", "experts"])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=None, help="sliding window (default: full causal)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense experts (E/k times the work)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    platform = jax.default_backend()
    device = jax.devices()[0].device_kind
    if platform not in ("gpu", "tpu"):
        print(f"no GPU/TPU ({device}): Pallas runs in interpret mode here, so nothing is timed; checking values")
        rows = check_without_accelerator()
    else:
        rows = (bench_attention(args, platform) if "attention" in args.what else [])
        rows += bench_experts(args) if "experts" in args.what else []
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, jax=jax.__version__, args=vars(args), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
