"""Everything a lent GPU can tell the project, in one command of a few minutes.

    python -m pip install -q --no-deps --no-build-isolation --no-index -e . && python -m tools.gpu_check OUT_DIR

Sections, in order (each one's result or error goes to OUT_DIR/gpu_check.json as soon as it ends, so a run
cut short keeps what it measured; a table is printed last):
  environment   jax and device versions, the device's memory limit, nvidia-smi
  ceilings      a bf16 8192^3 matmul's TFLOP/s and a 4 GiB device-to-device copy's bytes/s, random data
  accuracy      every flash-attention variant the models use (causal GQA, MQA, window + soft-cap, packed
                segments, prefix-shared rows; head_dim 64/128/256) and the grouped-matmul experts, forward
                and gradients, fp32 and bf16, on fresh random inputs and ids, against the plain-JAX
                references in fp32 at highest matmul precision: relative error ||got - ref|| / ||ref||
  kernels       tools/bench_kernels.py: flash attention vs jax.nn.dot_product_attention (cuDNN, XLA) at
                the Llama-3-8B shape, seq 2048 and 8192; Pallas experts vs lax.ragged_dot and dense at the
                Mixtral shape
  dpo_step      tools/bench.py on configs/bench_llama3_1b_dpo.yaml (Llama-3.2-1B shape, seq 2048,
                reference on device): step time, tokens/s, MFU against the measured matmul ceiling,
                on-device memory_analysis and allocator peak
  deviceless    `python -m maxdpo.compile` of the same step for h200:1 with no GPU (the prediction the
                project's recipes rely on), next to the on-device numbers
Exit status 1 if an accuracy check fails or a section raises.

Written for the device machine (its own Python with jax, flax, optax, transformers; no package registry):
it imports nothing of maxdpo that needs grain, datasets or tensorboardX. `--smoke` runs every section at
tiny shapes on whatever backend there is (interpret-mode kernels on a CPU) to check the script itself;
its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxdpo.kernels.attention_blocks import PREFIX_GROUP
from maxdpo.kernels.attention_reference import attention_reference
from maxdpo.kernels.flash_attention import flash_attention
from maxdpo.models.moe import dense_experts, pallas_experts, route
from tools import bench, bench_kernels
from tools.kernel_resources import attention_variants

STEP_CONFIG = "bench_llama3_1b_dpo.yaml"
SMOKE_STEP_CONFIG = "tiny_llama_dpo.yaml"
# ||got - ref|| / ||ref|| allowed: fp32 dots may run as tf32 (about 3e-4), bf16 operands 1e-3..1e-2
ERROR_BOUNDS = {"float32": 2e-3, "bfloat16": 2e-2}


def environment() -> dict:
    device = jax.devices()[0]
    import flax
    import optax

    found = dict(jax=jax.__version__, flax=flax.__version__, optax=optax.__version__,
                 python=platform.python_version(), backend=jax.default_backend(), device_kind=device.device_kind,
                 devices=jax.device_count(), memory_limit_bytes=(device.memory_stats() or {}).get("bytes_limit"))
    try:
        found["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                              "clocks.max.sm", "--format=csv"], capture_output=True, text=True,
                                             timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        found["nvidia_smi"] = f"unavailable: {error}"
    return found


def ceilings(smoke: bool) -> dict:
    size, iters = (256, 2) if smoke else (8192, 20)
    copy_bytes = (1 << 20) if smoke else (4 << 30)
    source = jax.random.normal(jax.random.key(0), (copy_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)  # reads and writes every byte once
    seconds = bench_kernels.median_ms(copy, (source,), iters) / 1e3
    return dict(matmul_bf16_tflops=bench.measured_peak(size, iters), matmul_size=size,
                copy_bytes_per_s=2 * copy_bytes / seconds, copy_bytes=copy_bytes)


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def attention_ids(layout: str, batch: int, seq: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(positions, segment ids) [batch, seq] of random rows: one sequence ("single"); sequences packed
    then padding ("packed", padding is segment 0); or pairs `prompt | chosen | rejected` ("shared",
    segment 4 * pair + branch, both completions positioned after the prompt) then padding."""
    positions = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
    segments = np.ones((batch, seq), np.int32)
    if layout == "single":
        return positions, segments
    positions[:], segments[:] = 0, 0
    for row in range(batch):
        cursor, index = 0, 1
        while True:
            if layout == "packed":
                lengths, starts, groups = [int(rng.integers(8, seq // 2))], [0], [index]
            else:
                lengths = [int(n) for n in rng.integers(4, seq // 6, 3)]
                starts, groups = [0, lengths[0], lengths[0]], [PREFIX_GROUP * index + branch for branch in range(3)]
            if cursor + sum(lengths) > seq:
                break
            for start, count, group in zip(starts, lengths, groups):
                positions[row, cursor:cursor + count] = np.arange(start, start + count)
                segments[row, cursor:cursor + count] = group
                cursor += count
            index += 1
    return positions, segments


def _value_and_grads(fn: Callable, args: tuple, cotangent) -> list:
    out, vjp = jax.vjp(fn, *args)
    return [out, *vjp(cotangent.astype(out.dtype))]


def _errors(parts: tuple[str, ...], got, want, dtype: str) -> dict:
    errors = {part: relative_error(g, w) for part, g, w in zip(parts, got, want)}
    return dict(dtype=dtype, errors=errors, passed=all(e <= ERROR_BOUNDS[dtype] for e in errors.values()))


def attention_accuracy(name: str, settings: dict, seq: int, rng: np.random.Generator) -> list[dict]:
    """The kernel on bf16 inputs and on the same values in fp32, each against the fp32 reference."""
    heads, kv_heads = settings["heads"]
    head_dim, batch = settings["head_dim"], 2
    layout = {"packed": "packed", "shared": "shared"}.get(settings.get("segments"), "single")
    positions, segments = (jnp.asarray(a) for a in attention_ids(layout, batch, seq, rng))
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 31))), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (batch, seq, kv_heads, head_dim), jnp.bfloat16) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
    common = dict(q_positions=positions, kv_positions=positions, q_segment_ids=segments, kv_segment_ids=segments,
                  scale=head_dim ** -0.5, sliding_window=settings.get("window"),
                  logit_softcap=settings.get("softcap"), shared_prefix=layout == "shared")
    kernel = jax.jit(lambda *qkv: _value_and_grads(lambda q, k, v: flash_attention(q, k, v, **common), qkv, cotangent))
    reference = jax.jit(lambda *qkv: _value_and_grads(lambda q, k, v: attention_reference(q, k, v, **common), qkv,
                                                      cotangent))
    exact = [x.astype(jnp.float32) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):
        want = reference(*exact)
    return [dict(check=f"attention {name}", seq=seq, **_errors(("out", "dq", "dk", "dv"), kernel(*inputs), want, dtype))
            for dtype, inputs in (("float32", exact), ("bfloat16", (q, k, v)))]


def experts_accuracy(shape: dict, rng: np.random.Generator) -> list[dict]:
    """The Pallas experts on bf16 operands and on the same values in fp32, each against the dense fp32 ones."""
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 31))), 6)
    tokens, hidden, mlp, count = shape["tokens"], shape["hidden"], shape["mlp"], shape["experts"]
    x = jax.random.normal(keys[0], (tokens, hidden), jnp.bfloat16)
    gate, up = ((hidden ** -0.5 * jax.random.normal(key, (count, hidden, mlp))).astype(jnp.bfloat16)
                for key in keys[1:3])
    down = (mlp ** -0.5 * jax.random.normal(keys[3], (count, mlp, hidden))).astype(jnp.bfloat16)
    _, experts, weights = route(jax.random.normal(keys[4], (tokens, count)), shape["top_k"])
    cotangent = jax.random.normal(keys[5], (tokens, hidden), jnp.float32)

    def run(impl):
        return jax.jit(lambda *w: _value_and_grads(
            lambda x, gate, up, down: impl(x, experts, weights, gate, up, down, jax.nn.silu), w, cotangent))

    exact = [w.astype(jnp.float32) for w in (x, gate, up, down)]
    with jax.default_matmul_precision("highest"):
        want = run(dense_experts)(*exact)
    kernel = run(pallas_experts)
    return [dict(check="experts", **shape, **_errors(("out", "dx", "dgate", "dup", "ddown"), kernel(*inputs), want,
                                                      dtype))
            for dtype, inputs in (("float32", exact), ("bfloat16", (x, gate, up, down)))]


def accuracy(smoke: bool) -> dict:
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    variants = attention_variants([64] if smoke else [64, 128, 256])
    seq = 64 if smoke else 1024
    experts_shape = (dict(tokens=64, hidden=64, mlp=128, experts=4, top_k=2) if smoke else
                     dict(tokens=2048, hidden=4096, mlp=14336, experts=8, top_k=2))
    if smoke:  # the prefix-shared variant (the most involved ids), few heads
        variants = {"prefix_shared_h64": {**variants["prefix_shared_h64"], "heads": (4, 2)}}
    checks = [check for name, settings in variants.items() for check in attention_accuracy(name, settings, seq, rng)]
    checks += experts_accuracy(experts_shape, rng)
    return dict(seed=seed, bounds=ERROR_BOUNDS, checks=checks, passed=all(c["passed"] for c in checks))


def kernel_timings(smoke: bool) -> dict:
    attention = argparse.Namespace(seq=[128] if smoke else [2048, 8192], batch=1, heads=4 if smoke else 32,
                                   kv_heads=2 if smoke else 8,
                                   head_dim=64 if smoke else 128, window=None, dtype="bfloat16",
                                   iters=1 if smoke else 20)
    experts = argparse.Namespace(tokens=64 if smoke else 4096, hidden=64 if smoke else 4096,
                                 mlp=128 if smoke else 14336, experts=8, top_k=2, no_dense=False,
                                 dtype="bfloat16", iters=1 if smoke else 20)
    return dict(rows=bench_kernels.bench_attention(attention, jax.default_backend())
                + bench_kernels.bench_experts(experts))


def dpo_step(out: Path, smoke: bool, peak_tflops) -> dict:
    report = out / "dpo_step.json"
    config = SMOKE_STEP_CONFIG if smoke else STEP_CONFIG
    argv = [config, "--steps", "1" if smoke else "10", "--warmup", "1" if smoke else "2", "--json", str(report)]
    if peak_tflops:
        argv += ["--peak-tflops", str(peak_tflops)]
    bench.main(argv)
    return dict(config=config, **json.loads(report.read_text()))


def deviceless(out: Path, smoke: bool, step: dict) -> dict:
    """The same step compiled for h200:1 by `python -m maxdpo.compile` in its own process (it selects the CPU
    platform before jax starts), next to what the GPU's compile and allocator said."""
    config = SMOKE_STEP_CONFIG if smoke else STEP_CONFIG
    report = out / "deviceless_compile.json"
    done = subprocess.run([sys.executable, "-m", "maxdpo.compile", config, "--topology", "h200:1", "--json",
                           str(report)], capture_output=True, text=True, timeout=900)
    if not report.is_file():
        raise RuntimeError(f"maxdpo.compile exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
    (predicted,) = json.loads(report.read_text())
    found = dict(config=config, predicted_gb=predicted["gb_per_device"])
    on_device = (step or {}).get("compiled_bytes_per_device")
    if on_device:
        found["on_device_gb"] = {name: value / 1e9 for name, value in on_device.items()}
    if (step or {}).get("device_peak_bytes"):
        found["on_device_peak_gb"] = step["device_peak_bytes"] / 1e9
    return found


def summary(report: dict) -> list[str]:
    lines = [f"device {report['sections'].get('environment', {}).get('device_kind')}, jax {jax.__version__}"
             f"{', SMOKE (numbers mean nothing)' if report['smoke'] else ''}"]
    for name, section in report["sections"].items():
        outcome = "ERROR " + section["error"] if "error" in section else "ok"
        lines.append(f"{name:12s} {section['seconds']:6.1f} s  {outcome}")
    ceiling = report["sections"].get("ceilings", {})
    if "matmul_bf16_tflops" in ceiling:
        lines.append(f"bf16 matmul {ceiling['matmul_bf16_tflops']:.0f} TFLOP/s, "
                     f"copy {ceiling['copy_bytes_per_s'] / 1e12:.2f} TB/s")
    for check in report["sections"].get("accuracy", {}).get("checks", []):
        worst = max(check["errors"].values())
        lines.append(f"{'PASS' if check['passed'] else 'FAIL'} {check['check']:32s} {check['dtype']:9s} "
                     f"worst rel err {worst:.1e}")
    for row in report["sections"].get("kernels", {}).get("rows", []):
        size = row.get("seq", row.get("tokens"))
        timing = (f"fwd {row['forward_ms']:8.3f} ms ({row['forward_tflops']:6.1f} TFLOP/s)  fwd+bwd "
                  f"{row['forward_backward_ms']:8.3f} ms ({row['forward_backward_tflops']:6.1f})"
                  if "forward_ms" in row else row.get("error", ""))
        lines.append(f"{row['kernel']:9s} {row['impl']:10s} {size:6d}  {timing}")
    step = report["sections"].get("dpo_step", {})
    if "step_s" in step:
        lines.append(f"dpo step {step['config']}: {step['step_s'] * 1e3:.1f} ms, {step['tokens_per_s']:.0f} tokens/s"
                     + (f", MFU {step['mfu']:.3f}" if "mfu" in step else ""))
    memory = report["sections"].get("deviceless", {})
    if "predicted_gb" in memory:
        lines.append(f"memory GB: deviceless {memory['predicted_gb']}, on device {memory.get('on_device_gb')}, "
                     f"allocator peak {memory.get('on_device_peak_gb')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for gpu_check.json, dpo_step.json and deviceless_compile.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    parser.add_argument("--skip", nargs="*", default=[], help="sections to leave out")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(smoke=args.smoke, command=" ".join(sys.argv), sections={})
    sections = {
        "environment": environment,
        "ceilings": lambda: ceilings(args.smoke),
        "accuracy": lambda: accuracy(args.smoke),
        "kernels": lambda: kernel_timings(args.smoke),
        "dpo_step": lambda: dpo_step(out, args.smoke,
                                     report["sections"].get("ceilings", {}).get("matmul_bf16_tflops")),
        "deviceless": lambda: deviceless(out, args.smoke, report["sections"].get("dpo_step")),
    }
    failed = False
    for name, run in sections.items():
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            result = run()
        except Exception as error:  # record it and go on: one lease, every section that can still run
            result = dict(error=f"{type(error).__name__}: {error}"[:2000], traceback=traceback.format_exc()[-4000:])
            failed = True
        failed = failed or result.get("passed") is False
        report["sections"][name] = dict(seconds=time.perf_counter() - start, **result)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"[gpu_check] {name} done in {report['sections'][name]['seconds']:.1f} s", flush=True)
    print("\n".join(summary(report)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
