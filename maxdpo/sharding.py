"""Device mesh from `mesh.*` and logical-axis rules -> PartitionSpecs / NamedShardings.

Logical names (`embed`, `heads`, `batch`, ...) are mapped to mesh axes through the rules in
`configs/base.yaml` (`mesh.logical_axis_rules`) by `kernels.partitioning.logical_to_spec`, the mapping the
kernels use too (under `mesh_context`). A dimension that a mesh axis does not divide stays replicated over
that axis rather than failing, so tiny models still run on big meshes.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxdpo.config import ConfigError, MeshConfig
from maxdpo.kernels import partitioning, platform

MESH_AXES = ("data", "fsdp", "expert", "tensor")  # outermost first; tensor is the innermost (fastest) axis


def mesh_shape(mesh_cfg: MeshConfig, device_count: int) -> dict[str, int]:
    """Axis sizes with at most one -1 filled so that their product is the device count."""
    sizes = {axis: getattr(mesh_cfg, axis) for axis in MESH_AXES}
    unknown = [axis for axis, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {['mesh.' + a for a in unknown]}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if device_count % known:
            raise ConfigError(f"mesh axes {sizes} cannot fill {device_count} devices")
        sizes[unknown[0]] = device_count // known
    if math.prod(sizes.values()) != device_count:
        raise ConfigError(f"mesh {sizes} has {math.prod(sizes.values())} slots for {device_count} devices; "
                          "the product of mesh.data/fsdp/expert/tensor must equal the device count")
    return sizes


def make_mesh(mesh_cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, ValueError, NotImplementedError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: dict) -> Iterator[None]:
    """The ambient mesh and logical rules to trace the model under: its kernels shard by both and are built
    for the mesh's devices (Mosaic for TPU, Triton for GPU), whatever the host's backend."""
    target = platform.compile_target(mesh.devices.flat[0].platform)
    with jax.set_mesh(mesh), partitioning.logical_rules(rules), target:
        yield


def tree_shardings(abstract_tree, axes_tree, rules: dict, mesh: Mesh):
    """NamedSharding for every array of `abstract_tree`, from the matching logical axes."""
    return jax.tree.map(
        lambda leaf, axes: NamedSharding(mesh, partitioning.logical_to_spec(axes, rules, mesh, leaf.shape)),
        abstract_tree, axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh, rules: dict) -> NamedSharding:
    """Every batch field's rows (its leading dimension) split over the `batch` rule."""
    return NamedSharding(mesh, partitioning.logical_to_spec(("batch",), rules, mesh))


def data_parallel_size(mesh: Mesh, rules: dict) -> int:
    return math.prod(mesh.shape[axis] for axis in rules.get("batch") or ())


def micro_batch_parallel_size(mesh: Mesh, rules: dict, micro: int) -> int:
    """The data-parallel size, which must divide the micro batch (else its rows would be replicated)."""
    size = data_parallel_size(mesh, rules)
    if micro % size:
        raise ConfigError(f"micro batch of {micro} rows (trainer.micro_batch_size or trainer.batch_size) is not "
                          f"divisible by the data-parallel size {size} of mesh {dict(mesh.shape)}")
    return size


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
