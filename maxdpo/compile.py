"""`python -m maxdpo.compile CONFIG --topology NAME [key=value ...]`: ahead-of-time compile of the real train step.

The program of CONFIG (model, mesh, loss, reference, remat, micro-batching, kernels) is lowered and
compiled for the devices of NAME with abstract inputs only (no weights, no data): TPU slices through
libtpu (`v5p:4x4x2`, `v5e:4x4`, `v4:2x2x2`, or a size alias such as `v5p-64`, counted in TensorCores as
Google names them), NVIDIA GPUs through XLA:GPU with no GPU present (`h100:8`, `h200:8`, `h100:2x8` for two
hosts of eight), Pallas kernels on their Mosaic or Triton path (`maxdpo.topology`). The batch is the global
`trainer.batch_size` pairs at `data.max_length` (the unpacked, worst-case shape). A configured micro batch
that the topology's data-parallel size does not divide is raised to the next one that it does (and said),
unless `trainer.micro_batch_size` is given on the command line.

Prints per-device memory (arguments, outputs, temporaries, total) as the target's compiler plans it, model
FLOPs per step (`maxdpo.flops`) and whether the total fits the chip's memory; `--json` writes the same. Exit
status 1 when it does not fit, 2 on a config or topology error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax

from maxdpo.config import Config, ConfigError, overrides_set
from maxdpo.configure import load_config
from maxdpo.data.sources import resolve_path
from maxdpo.flops import dpo_step_flops
from maxdpo.program import build_train_program
from maxdpo.sharding import data_parallel_size, make_mesh
from maxdpo.stages import stage_configs
from maxdpo.topology import CHIP_MEMORY_GB, Topology, TopologyError, compile_devices, parse_topology, use_cpu_host

def architecture_only(cfg: Config) -> Config:
    """`cfg` with a `model.path` that is not on this machine replaced by the family's default architecture
    (the full-size model: Llama-3-8B, Mixtral-8x7B, Gemma-7B, ...): compiling needs shapes, not weights."""
    if cfg.model.path and not Path(resolve_path(cfg.model.path)).exists():
        print(f"maxdpo.compile: {cfg.model.path} is not here; using the {cfg.model.family} default architecture "
              f"with model.overrides {cfg.model.overrides or {}}")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=None))
    return cfg


def fit_micro_batch(cfg: Config, devices) -> Config:
    """`cfg` with a micro batch that the topology's data-parallel size divides: the config's own when it does,
    else the smallest such divisor of trainer.batch_size above it (said on stdout). For a micro batch set on
    the command line the caller skips this, and a misfit stays an error."""
    micro, rows = cfg.trainer.micro_batch, cfg.trainer.batch_size
    parallel = data_parallel_size(make_mesh(cfg.mesh, devices), cfg.mesh.logical_axis_rules)
    if micro % parallel == 0:
        return cfg
    fitting = [m for m in range(parallel, rows + 1, parallel) if rows % m == 0]
    if not fitting:
        raise ConfigError(f"trainer.batch_size {rows} cannot be split over the {parallel} data-parallel devices of "
                          f"this topology; set trainer.batch_size to a multiple of {parallel}")
    chosen = next((m for m in fitting if m >= micro), fitting[-1])
    print(f"maxdpo.compile: {cfg.run.name}: micro batch {micro} does not split over {parallel} data-parallel "
          f"devices; using trainer.micro_batch_size={chosen} (set it on the command line to choose)")
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, micro_batch_size=chosen))


def compile_program(cfg: Config, devices) -> tuple:
    """(compiled train step, its program) for `cfg` on `devices`, from abstract inputs: the global batch of
    `trainer.batch_size` pairs at `data.max_length` (the unpacked, worst-case shape)."""
    program = build_train_program(cfg, make_mesh(cfg.mesh, devices), total_steps=1000)
    with program.mesh_context():
        args = program.abstract_args(cfg.trainer.batch_size)
        return program.train_step.lower(*args).compile(), program


def report(cfg: Config, topology: Topology, devices) -> dict:
    start = time.perf_counter()
    devices_per_chip = len(devices) // topology.chips
    capacity = CHIP_MEMORY_GB[topology.chip] * 1e9 / devices_per_chip
    rows, seq = cfg.trainer.batch_size, cfg.data.max_length
    basics = dict(config=cfg.run.name, topology=topology.name, devices=len(devices), chip=topology.chip)
    try:
        compiled, program = compile_program(cfg, devices)
    except jax.errors.JaxRuntimeError as err:  # libtpu refuses a program that does not fit, with the sizes
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return dict(**basics, rows=rows, micro_batch=cfg.trainer.micro_batch, seq=seq,
                    capacity_gb_per_device=capacity / 1e9, fits=False, compiler_refused=str(err).splitlines()[0])
    spec = program.spec
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    return dict(
        **basics,
        mesh={axis: size for axis, size in program.mesh.shape.items() if size > 1}, model=spec.family,
        params_billion=spec.num_params() / 1e9, rows=rows, micro_batch=cfg.trainer.micro_batch,
        seq=seq, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
        reference=("precomputed" if cfg.reference.precompute else "moving model (TR-DPO)" if program.reference_sync
                   else "model" if program.reference_model
                   else "base, adapters off" if program.execution.lora and program.settings.uses_reference else "none"),
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
    parser.add_argument("--topology", required=True,
                        help="v5p:4x4x2, v5p-64, v5e:4x4, v4:2x2x2, h100:8, h200:8, h100:2x8")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    use_cpu_host()
    try:
        topology = parse_topology(args.topology)
        cfg = load_config(args.config, args.overrides)
        configs = [stage for _, stage in stage_configs(cfg)] if cfg.stages else [cfg]
        first = configs[0].model  # later stages load the previous stage's export: the first one's architecture
        configs = [architecture_only(dataclasses.replace(
            stage, model=dataclasses.replace(stage.model, path=first.path, overrides=first.overrides)))
            for stage in configs]
        devices = compile_devices(topology)
        if not overrides_set(args.overrides, "trainer.micro_batch_size"):
            configs = [fit_micro_batch(stage, devices) for stage in configs]
        results = [report(stage, topology, devices) for stage in configs]
    except (ConfigError, TopologyError) as err:
        print(f"maxdpo.compile: error: {err}", file=sys.stderr)
        return 2
    for result in results:
        if "compiler_refused" in result:
            print(f"{result['config']} on {result['topology']} ({result['devices']} devices): {result['rows']} pairs x "
                  f"{result['seq']} (micro {result['micro_batch']}) DOES NOT FIT: {result['compiler_refused']}")
            continue
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
