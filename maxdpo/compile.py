"""`python -m maxdpo.compile CONFIG --topology NAME [key=value ...]`: ahead-of-time compile of the real train step.

The step of CONFIG (model, mesh, loss, reference, remat, micro-batching) is lowered and compiled for the
devices of NAME with abstract inputs only (no weights, no data): TPU slices through libtpu's topology
descriptions (`v5p:4x4x2`, `v5e:4x4`, `v4:2x2x2`, or a size alias such as `v5p-64`, counted in
TensorCores as Google names them), GPUs by a same-sized mesh of host CPU devices standing in for them
(`h100:8`; the memory per device is then XLA's CPU plan of the XLA attention and expert paths, an upper
bound for the Pallas kernels'). The batch is the global `trainer.batch_size` pairs at `data.max_length`
(the unpacked, worst-case shape).

Prints per-device memory (arguments, outputs, temporaries, total), model FLOPs per step (`maxdpo.flops`)
and whether the total fits the chip's memory; `--json` writes the same. Exit status 1 when it does not fit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import jax
from jax.experimental import topologies

from maxdpo.config import Config, ConfigError
from maxdpo.configure import load_config
from maxdpo.data.sources import resolve_path
from maxdpo.flops import dpo_step_flops
from maxdpo.program import build_train_program
from maxdpo.sharding import make_mesh
from maxdpo.stages import stage_configs

CHIP_MEMORY_GB = {"v5p": 95, "v5e": 16, "v4": 32, "v6e": 32, "h100": 80, "h200": 141, "a100": 80}
TPU_CHIPS = ("v5p", "v5e", "v4", "v6e")
# TensorCores per chip, for the `v5p-64` style names (v5e and v6e have one, v4 and v5p two).
CORES_PER_CHIP = {"v5p": 2, "v4": 2, "v5e": 1, "v6e": 1}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    chip: str  # key of CHIP_MEMORY_GB
    chips: int
    tpu_name: str | None  # libtpu's topology name; None: host CPU devices standing in for GPUs


def _slice_shape(chip: str, chips: int) -> str:
    """The most cubic 3-D (2-D for v5e/v6e) grid of `chips` in powers of two, as slices are cut."""
    dims = [1, 1] if chip in ("v5e", "v6e") else [1, 1, 1]
    for _ in range(int(math.log2(chips))):
        dims[dims.index(min(dims))] *= 2
    return "x".join(map(str, sorted(d for d in dims if d > 1) + [d for d in dims if d == 1]))  # 2x2x1, 2x4x4


def parse_topology(name: str) -> Topology:
    lowered = name.lower()
    explicit = re.fullmatch(r"(v5p|v5e|v4|v6e):(\d+(?:x\d+)+)", lowered)
    if explicit:
        chip = explicit.group(1)
        return Topology(name, chip, math.prod(int(d) for d in explicit.group(2).split("x")), lowered)
    alias = re.fullmatch(r"(v5p|v5e|v4|v6e)-(\d+)", lowered)
    if alias:
        chip, cores = alias.group(1), int(alias.group(2))
        chips = cores // CORES_PER_CHIP[chip]
        if chips < 1 or chips & (chips - 1):
            raise SystemExit(f"maxdpo.compile: {name}: expected a power-of-two slice size")
        return Topology(name, chip, chips, f"{chip}:{_slice_shape(chip, chips)}")
    gpu = re.fullmatch(r"(h100|h200|a100):(\d+)", lowered)
    if gpu:
        return Topology(name, gpu.group(1), int(gpu.group(2)), None)
    raise SystemExit(f"maxdpo.compile: unknown topology {name!r}; use e.g. v5p:4x4x2, v5p-64, v5e:4x4, v4:2x2x2 "
                     "or h100:8")


def _devices(topology: Topology):
    if topology.tpu_name is None:
        devices = jax.devices("cpu")
        if len(devices) < topology.chips:
            raise SystemExit(f"maxdpo.compile: {topology.name} needs {topology.chips} host devices, found "
                             f"{len(devices)} (XLA_FLAGS was set before this process started JAX)")
        return devices[:topology.chips]
    return topologies.get_topology_desc(platform="tpu", topology_name=topology.tpu_name).devices


def architecture_only(cfg: Config) -> Config:
    """`cfg` with a `model.path` that is not on this machine replaced by the family's default architecture
    (the full-size model: Llama-3-8B, Mixtral-8x7B, Gemma-7B, ...): compiling needs shapes, not weights."""
    if cfg.model.path and not Path(resolve_path(cfg.model.path)).exists():
        print(f"maxdpo.compile: {cfg.model.path} is not here; using the {cfg.model.family} default architecture "
              f"with model.overrides {cfg.model.overrides or {}}")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=None))
    return cfg


def xla_kernels(cfg: Config) -> Config:
    """For the host-CPU stand-in of a GPU mesh: Pallas kernels would compile in interpret mode, whose
    buffers say nothing about the GPU's, so attention and experts take their XLA paths (attention then
    holds [T, T] scores: an upper bound on the flash kernel's memory)."""
    model = cfg.model
    if model.attention == "pallas" or model.moe_impl == "pallas":
        model = dataclasses.replace(model, attention="xla",
                                    moe_impl="ragged" if model.moe_impl == "pallas" else model.moe_impl)
        print(f"maxdpo.compile: host devices stand in for GPUs: model.attention=xla, model.moe_impl={model.moe_impl} "
              "(XLA paths; memory is an upper bound for the Pallas kernels)")
    return dataclasses.replace(cfg, model=model)


def compile_program(cfg: Config, devices) -> tuple:
    """(compiled train step, its program) for `cfg` on `devices`, from abstract inputs: the global batch of
    `trainer.batch_size` pairs at `data.max_length` (the unpacked, worst-case shape)."""
    program = build_train_program(cfg, make_mesh(cfg.mesh, devices), total_steps=1000)
    with program.mesh_context():
        args = program.abstract_args(cfg.trainer.batch_size)
        return program.train_step.lower(*args).compile(), program


def report(cfg: Config, topology: Topology, devices) -> dict:
    start = time.perf_counter()
    compiled, program = compile_program(cfg, devices)
    spec = program.spec
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    devices_per_chip = len(devices) // topology.chips
    capacity = CHIP_MEMORY_GB[topology.chip] * 1e9 / devices_per_chip
    rows, seq = cfg.trainer.batch_size, cfg.data.max_length
    return dict(
        config=cfg.run.name, topology=topology.name, devices=len(devices), chip=topology.chip,
        mesh={axis: size for axis, size in program.mesh.shape.items() if size > 1}, model=spec.family,
        params_billion=spec.num_params() / 1e9, rows=rows, micro_batch=cfg.trainer.micro_batch,
        seq=seq, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
        reference="precomputed" if cfg.reference.precompute else "model" if program.reference_model else "none",
        compile_s=round(time.perf_counter() - start, 1),
        gb_per_device=dict(arguments=memory.argument_size_in_bytes / 1e9, outputs=memory.output_size_in_bytes / 1e9,
                           aliased=memory.alias_size_in_bytes / 1e9, temporaries=memory.temp_size_in_bytes / 1e9,
                           total=total / 1e9),
        capacity_gb_per_device=capacity / 1e9, fits=total <= capacity,
        model_tflops_per_step=dpo_step_flops(spec, rows, seq, reference=program.reference_model) / 1e12,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maxdpo.compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (path or bundled name)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.micro_batch_size=4")
    parser.add_argument("--topology", required=True, help="v5p:4x4x2, v5p-64, v5e:4x4, v4:2x2x2, h100:8, ...")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    topology = parse_topology(args.topology)
    if topology.tpu_name is None and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={topology.chips}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        cfg = load_config(args.config, args.overrides)
        configs = [stage for _, stage in stage_configs(cfg)] if cfg.stages else [cfg]
        first = configs[0].model  # later stages load the previous stage's export: the first one's architecture
        configs = [architecture_only(dataclasses.replace(
            stage, model=dataclasses.replace(stage.model, path=first.path, overrides=first.overrides)))
            for stage in configs]
        if topology.tpu_name is None:
            configs = [xla_kernels(stage) for stage in configs]
        devices = _devices(topology)
        results = [report(stage, topology, devices) for stage in configs]
    except ConfigError as err:
        print(f"maxdpo.compile: error: {err}", file=sys.stderr)
        return 2
    for result in results:
        memory = result["gb_per_device"]
        print(f"{result['config']} on {result['topology']} ({result['devices']} devices, mesh {result['mesh']}): "
              f"{result['params_billion']:.1f}B {result['model']}, {result['rows']} pairs x {result['seq']} "
              f"(micro {result['micro_batch']}), reference {result['reference']}, compiled in {result['compile_s']} s")
        print(f"  per device: arguments {memory['arguments']:.2f} GB, temporaries {memory['temporaries']:.2f} GB, "
              f"total {memory['total']:.2f} GB of {result['capacity_gb_per_device']:.1f} GB -> "
              f"{'fits' if result['fits'] else 'DOES NOT FIT'}; {result['model_tflops_per_step']:.1f} TFLOP per step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(result["fits"] for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
