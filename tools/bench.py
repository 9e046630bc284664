"""Times the full DPO train step of a config: policy forward + backward, the reference forward (unless
precomputed or the loss has none: the random-init policy's copy stands in for the reference), optimizer.

    python tools/bench.py                                   # the default job's model and mesh
    python tools/bench.py CONFIG.yaml key=value ... --rows 8 --seq 2048 --prompt 1024 --json out.json

The model is random-initialised from the config (`model.overrides` set its shape), the batch is
synthetic: `--rows` pairs, chosen and rejected of `--seq` tokens each, the first `--prompt` of them
prompt (laid out once per pair with `data.prefix_sharing=true`; tokens/s still counts both sequences).
Prints compile time, step time (median of --steps after --warmup), tokens/s (chosen + rejected tokens,
all real), peak memory (the device's allocator peak where it reports one, else the compiled
step's footprint per device, and the process's peak RSS), and MFU = model FLOPs per step
(`maxdpo/flops.py`) / step time / (devices x peak). The peak is the device's bf16 dense peak from a
table (`--peak-tflops` overrides it; `--measure-peak` times a large bf16 matmul instead); on a CPU
it is unknown and MFU is left out.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from maxdpo.configure import load_config
from maxdpo.data.batch import Batch, collate
from maxdpo.data.prefix_sharing import collate_shared
from maxdpo.data.tokenize import TokenizedPair
from maxdpo.dpo.losses import loss_record
from maxdpo.flops import dpo_step_flops
from maxdpo.program import build_train_program
from maxdpo.sharding import make_mesh
from maxdpo.weights import init_params

PEAK_BF16_TFLOPS = {  # dense bf16 per chip, vendor figures
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
    "TPU v4": 275.0, "TPU v6 lite": 918.0,
}


def table_peak(device_kind: str):
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return peak
    return None


def measured_peak(size: int = 8192, iters: int = 20) -> float:
    """TFLOP/s of one device on a size^3 bf16 matmul of random values (median)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e12


def synthetic_batch(rows: int, seq: int, prompt: int, vocab: int, shared: bool, precompute: bool,
                    seed: int = 0, unpaired: bool = False) -> Batch:
    """One pair per row, chosen and rejected of `seq` tokens sharing the first `prompt`; every token real.
    With prefix sharing the row is prompt | chosen | rejected (prompt + 2 x completion tokens). `unpaired`:
    alternate desirable and undesirable labels (KTO's example | mismatched example rows)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(rows):
        prompt_ids = rng.integers(3, vocab, prompt, dtype=np.int32)
        chosen, rejected = (np.concatenate([prompt_ids, rng.integers(3, vocab, seq - prompt, dtype=np.int32)])
                            for _ in range(2))
        pairs.append(TokenizedPair(chosen, rejected, prompt, prompt))
    if shared:
        batch = collate_shared([[pair] for pair in pairs], 2 * seq - prompt, 1, pad_id=0)
    else:
        batch = collate([[pair] for pair in pairs], seq, 1, pad_id=0)
    if precompute:
        batch = batch.replace(ref_logps=rng.normal(-50.0, 5.0, (rows, 1, 2)).astype(np.float32))
    if unpaired:
        batch = batch.replace(labels=(np.arange(rows) % 2).astype(np.float32)[:, None])
    return batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="config YAML (default: the bundled default job)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--rows", type=int, default=None, help="pairs per step (default: trainer.batch_size)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: data.max_length)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default: half of --seq)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--measure-peak", action="store_true")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_intermixed_args(argv)
    if args.config and "=" in args.config:  # only overrides were given
        args.overrides, args.config = [args.config, *args.overrides], None

    overrides = list(args.overrides) + ([f"trainer.batch_size={args.rows}"] if args.rows else [])
    cfg = load_config(args.config, overrides)
    rows = cfg.trainer.batch_size
    seq = args.seq or cfg.data.max_length
    prompt = seq // 2 if args.prompt is None else args.prompt
    precompute = cfg.reference.precompute
    program = build_train_program(cfg, make_mesh(cfg.mesh), args.warmup + args.steps)
    spec = program.spec

    with program.mesh_context():
        params = init_params(program, cfg.run.seed)
        ref_params = program.reference_weights(params) if program.reference_model else None
        state = program.init_state(params)
        host_batch = synthetic_batch(rows, seq, prompt, spec.vocab_size, cfg.data.prefix_sharing, precompute,
                                     unpaired=loss_record(cfg.dpo.objective).unpaired)
        batch = jax.device_put(host_batch, program.batch_sharding)
        start = time.perf_counter()
        compiled = program.train_step.lower(state, ref_params, batch).compile()
        compile_s = time.perf_counter() - start
        times = []
        for index in range(args.warmup + args.steps):
            start = time.perf_counter()
            state, metrics = compiled(state, ref_params, batch)
            jax.block_until_ready(metrics)
            if index >= args.warmup:
                times.append(time.perf_counter() - start)

    step_s = statistics.median(times)
    device = jax.devices()[0]
    tokens = rows * 2 * seq
    flops = dpo_step_flops(spec, rows, seq, reference=program.reference_model)
    footprint = compiled.memory_analysis()
    result = dict(
        device=device.device_kind, devices=jax.device_count(), mesh=dict(program.mesh.shape),
        data_parallel=program.data_parallel, model=spec.family, params=spec.num_params(),
        layers=spec.num_layers, rows=rows, seq=seq, prompt=prompt, micro_batch=cfg.trainer.micro_batch,
        dtype=cfg.model.dtype, prefix_sharing=cfg.data.prefix_sharing, attention=program.execution.attention,
        moe_impl=program.execution.moe_impl, remat=program.execution.remat, precompute_reference=precompute,
        compile_s=compile_s, step_s=step_s, step_s_all=times, tokens_per_s=tokens / step_s,
        model_tflops_per_step=flops / 1e12, achieved_tflops_per_device=flops / step_s / jax.device_count() / 1e12,
        compiled_bytes_per_device=dict(arguments=footprint.argument_size_in_bytes, temps=footprint.temp_size_in_bytes,
                                       outputs=footprint.output_size_in_bytes),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        loss=float(metrics["loss"]),
    )
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["device_peak_bytes"] = stats["peak_bytes_in_use"]
    peak = args.peak_tflops or (measured_peak() if args.measure_peak else table_peak(device.device_kind))
    if peak:
        result.update(peak_tflops_per_device=peak, mfu=result["achieved_tflops_per_device"] / peak)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
