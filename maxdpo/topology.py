"""Named accelerator topologies -> compile-only devices, for ahead-of-time compiles on a CPU machine.

TPU slices come from libtpu's topology descriptions (`v5p:4x4x2`, `v5e:4x4`, or a size alias such as
`v5p-64`, counted in TensorCores as Google names them). NVIDIA GPUs come from XLA:GPU with no GPU present
(`h100:8`, `h200:8`, `h100:2x8` for 2 hosts of 8): the CUDA plugin compiles for the chip described by
`configs/gpu/<chip>.txtpb`, through ptxas to SASS. The process must use the CPU platform (`use_cpu_host`
before any JAX backend starts), so the plugin never looks for a GPU.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from typing import Optional

import jax

from maxdpo.config import bundled_config_path

CHIP_MEMORY_GB = {"v5p": 95, "v5e": 16, "v4": 32, "v6e": 32, "h100": 80, "h200": 141}
GPU_CHIPS = ("h100", "h200")
# TensorCores per chip, for the `v5p-64` style names (v5e and v6e have one, v4 and v5p two).
CORES_PER_CHIP = {"v5p": 2, "v4": 2, "v5e": 1, "v6e": 1}


class TopologyError(ValueError):
    """A topology name that is not understood, or a compiler that is not installed; the message says which."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    chip: str  # key of CHIP_MEMORY_GB
    chips: int
    tpu_name: Optional[str] = None  # libtpu's topology name (TPU slices)
    hosts: int = 1  # GPU hosts; chips // hosts GPUs each

    @property
    def is_gpu(self) -> bool:
        return self.chip in GPU_CHIPS


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
            raise TopologyError(f"{name}: expected a power-of-two slice size")
        return Topology(name, chip, chips, f"{chip}:{_slice_shape(chip, chips)}")
    gpu = re.fullmatch(r"(h100|h200):(?:(\d+)x)?(\d+)", lowered)
    if gpu:
        hosts, per_host = int(gpu.group(2) or 1), int(gpu.group(3))
        return Topology(name, gpu.group(1), hosts * per_host, hosts=hosts)
    raise TopologyError(f"unknown topology {name!r}; use e.g. v5p:4x4x2, v5p-64, v5e:4x4, v4:2x2x2, h100:8, h200:8 "
                        "or h100:2x8 (hosts x GPUs)")


def use_cpu_host() -> None:
    """Makes this process's JAX backend the CPU (before any backend starts), so compile-only devices of any
    platform come from topology descriptions and an installed CUDA plugin never looks for a GPU."""
    jax.config.update("jax_platforms", "cpu")


def compile_devices(topology: Topology) -> list:
    """The topology's compile-only devices (no memory is allocated on them)."""
    from jax.experimental import topologies

    if topology.tpu_name is not None:
        if importlib.util.find_spec("libtpu") is None:
            raise TopologyError(f"{topology.name}: compiling for TPU needs libtpu: pip install \"jax[tpu]=={jax.__version__}\"")
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology.tpu_name).devices)
    if importlib.util.find_spec("jax_plugins.xla_cuda13") is None:
        raise TopologyError(f"{topology.name}: compiling for NVIDIA GPUs needs the CUDA plugin of this jax: pip install "
                            f"\"jax-cuda13-plugin=={jax.__version__}\" \"jax-cuda13-pjrt=={jax.__version__}\"")
    target = bundled_config_path("gpu").joinpath(f"{topology.chip}.txtpb").read_text()
    shape = f"1x{topology.hosts}x{topology.chips // topology.hosts}"  # slices x hosts x GPUs per host
    return list(topologies.get_topology_desc(platform="cuda", topology=shape, target_config=target).devices)
