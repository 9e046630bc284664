"""Registers, spills and shared memory of the Pallas GPU kernels as built for an H100, with no GPU present.

    python -m tools.kernel_resources [--head-dims 64 128 256] [--json out.json]

Each flash-attention variant the models use (causal GQA, MQA, sliding window + soft-cap as Gemma-2,
packed segments, prefix-shared rows), forward and backward, at 2048 tokens in bf16, and the grouped
matmul forward and backward at the Mixtral expert shape, are compiled by XLA:GPU deviceless
(`maxdpo.topology`); XLA writes each Triton kernel's PTX and its launch (grid, threads, dynamic shared memory)
to `--xla_dump_to`, and `ptxas -v -arch=sm_90a` reports its registers and spill bytes. From those, the
blocks one H100 SM holds at once. Prints one row per kernel; exit status 1 if any kernel spills or exceeds
255 registers. XLA_FLAGS is set here, so run it in its own process.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PTXAS_CANDIDATES = ("/usr/local/cuda/bin/ptxas", "/usr/local/cuda-13.0/bin/ptxas")
REGISTER_LIMIT = 255
# One H100 (sm_90) SM: 64K registers, 228 KiB shared memory (1 KiB of it reserved per block), 2048 threads, 32 blocks.
SM_REGISTERS, SM_SHARED_BYTES, BLOCK_RESERVED_SHARED, SM_THREADS, SM_BLOCKS = 65536, 233472, 1024, 2048, 32


def find_ptxas() -> str:
    found = shutil.which("ptxas") or next((p for p in PTXAS_CANDIDATES if Path(p).is_file()), None)
    if found is None:
        raise SystemExit("kernel_resources: ptxas not found; install the CUDA 13 toolkit or "
                         "pip install nvidia-cuda-nvcc==13.0.88 and put its bin/ on PATH")
    return found


def attention_variants(head_dims: list[int]) -> dict[str, dict]:
    """name -> flash_attention settings: heads (N, K), window, soft-cap, segment layout."""
    variants = {}
    for h in head_dims:
        variants[f"causal_gqa_h{h}"] = dict(head_dim=h, heads=(32, 8))
        variants[f"window_softcap_h{h}"] = dict(head_dim=h, heads=(16, 8), window=4096, softcap=50.0)
        variants[f"packed_h{h}"] = dict(head_dim=h, heads=(32, 8), segments="packed")
        variants[f"prefix_shared_h{h}"] = dict(head_dim=h, heads=(32, 8), segments="shared")
    variants[f"mqa_h{head_dims[0]}"] = dict(head_dim=head_dims[0], heads=(8, 1))
    return variants


def compile_attention(name: str, settings: dict, sharding) -> None:
    import jax
    import jax.numpy as jnp

    from maxdpo.kernels.flash_attention import flash_attention

    seq, (heads, kv_heads), h = 2048, settings["heads"], settings["head_dim"]

    def loss(q, k, v, positions, segments):
        out = flash_attention(q, k, v, q_positions=positions, kv_positions=positions, q_segment_ids=segments,
                              kv_segment_ids=segments, scale=h ** -0.5, sliding_window=settings.get("window"),
                              logit_softcap=settings.get("softcap"), shared_prefix=settings.get("segments") == "shared",
                              backend="gpu", interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    grads = jax.grad(loss, argnums=(0, 1, 2))
    grads.__name__ = name  # the dump's file names carry it
    shapes = [((1, seq, heads, h), jnp.bfloat16), ((1, seq, kv_heads, h), jnp.bfloat16),
              ((1, seq, kv_heads, h), jnp.bfloat16), ((1, seq), jnp.int32), ((1, seq), jnp.int32)]
    jax.jit(grads).lower(*(jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes)).compile()


def compile_grouped_matmul(sharding, backend: str = "gpu"):
    """The Pallas experts' forward + backward at the Mixtral-8x7B shape (8 experts, top-2, 4096 x 14336, 4096
    tokens, bf16), compiled with `backend`'s kernels for `sharding`'s device."""
    import jax
    import jax.numpy as jnp

    from maxdpo.models.moe import pallas_experts

    def grouped_matmul_mixtral(x, gate, up, down, experts):
        def loss(x, gate, up, down):
            out = pallas_experts(x, experts, jnp.full(experts.shape, 0.5, jnp.float32), gate, up, down, jax.nn.silu,
                                 backend=backend, interpret=False)
            return jnp.sum(out.astype(jnp.float32) ** 2)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, gate, up, down)

    shapes = [((4096, 4096), jnp.bfloat16), ((8, 4096, 14336), jnp.bfloat16), ((8, 4096, 14336), jnp.bfloat16),
              ((8, 14336, 4096), jnp.bfloat16), ((4096, 2), jnp.int32)]
    return jax.jit(grouped_matmul_mixtral).lower(*(jax.ShapeDtypeStruct(s, d, sharding=sharding)
                                                   for s, d in shapes)).compile()


def ptx_kernels(dump: Path) -> list[tuple[str, str, Path]]:
    """(compiled function, Triton kernel name, PTX file) of every Pallas kernel in the dump."""
    found = []
    for path in sorted(dump.glob("*.ptx")):
        function = re.match(r"module_\d+\.jit_(\w+?)\.\d+\.ptx", path.name)
        for kernel in re.findall(r"\.visible \.entry (\w+)\(", path.read_text()):
            if kernel.startswith(("flash_attention", "grouped_matmul")) and function:
                found.append((function.group(1), kernel, path))
    return found


def ptxas_report(ptxas: str, ptx: Path) -> dict:
    out = subprocess.run([ptxas, "-v", "-arch=sm_90a", str(ptx), "-o", os.devnull], capture_output=True,
                         text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": registers, "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def kernel_launches(dump: Path, function: str) -> dict[str, dict]:
    """Triton kernel name -> {grid, threads, shared_bytes} from XLA's thunk sequence of `function`."""
    launches = {}
    for path in dump.glob(f"module_*.jit_{function}.thunk_sequence.txt"):
        for name, grid, threads, shared in re.findall(
                r"kCustomKernel \[[^]]*\] (\w+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+) bytes",
                path.read_text()):
            launches[name] = {"grid": [int(g) for g in grid.split(",")], "threads": int(threads.split(",")[0]),
                              "shared_bytes": int(shared)}
    return launches


def blocks_per_sm(registers: int, threads: int, shared_bytes: int) -> int:
    """Resident blocks per H100 SM, limited by registers (allocated per warp in units of 256), shared memory,
    threads and the block limit."""
    warps = -(-threads // 32)
    registers_per_warp = -(-registers * 32 // 256) * 256
    by_registers = SM_REGISTERS // (registers_per_warp * warps)
    by_shared = SM_SHARED_BYTES // (shared_bytes + BLOCK_RESERVED_SHARED)
    return min(by_registers, by_shared, SM_THREADS // threads, SM_BLOCKS)


def kernel_row(ptxas: str, function: str, kernel: str, ptx: Path, launches: dict[str, dict]) -> dict:
    row = {"function": function, "kernel": kernel, **ptxas_report(ptxas, ptx), **launches[kernel]}
    row["blocks_per_sm"] = blocks_per_sm(row["registers"], row["threads"], row["shared_bytes"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--no-grouped-matmul", action="store_true")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    ptxas = find_ptxas()
    dump = Path(tempfile.mkdtemp(prefix="maxdpo-ptx-"))
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_pass_re=^$".strip()

    from maxdpo.topology import compile_devices, parse_topology, use_cpu_host
    use_cpu_host()
    import jax

    mesh = jax.sharding.Mesh(compile_devices(parse_topology("h100:1")), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    for name, settings in attention_variants(args.head_dims).items():
        compile_attention(name, settings, sharding)
    if not args.no_grouped_matmul:
        compile_grouped_matmul(sharding)
    rows = [kernel_row(ptxas, function, kernel, path, kernel_launches(dump, function))
            for function, kernel, path in ptx_kernels(dump)]
    for row in rows:
        print(f"{row['function']:28s} {row['kernel']:34s} registers {row['registers']:3d}  "
              f"spills {row['spill_stores']}/{row['spill_loads']} B  shared {row['shared_bytes'] / 1024:5.1f} KiB  "
              f"threads {row['threads']:3d}  blocks/SM {row['blocks_per_sm']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    shutil.rmtree(dump, ignore_errors=True)
    bad = [r for r in rows if r["registers"] > REGISTER_LIMIT or r["spill_stores"] or r["spill_loads"]]
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
