"""Runs a kernel once per shard under the ambient mesh (`jax.set_mesh`, set by the trainer).

A Pallas call is an opaque custom call to XLA's partitioner, which would gather its inputs and run it
whole on every device. Under a mesh the kernels are wrapped in `shard_map` instead: rows (batch) split
over the data-parallel axes, heads (attention) or the MLP width (experts) over `tensor`. Axes follow
the default logical rules (batch -> data, fsdp, expert; heads, mlp -> tensor); arrays sharded otherwise
are resharded at the boundary. An axis that does not divide its dimension is left out.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax

BATCH_AXES = ("data", "fsdp", "expert")
TENSOR_AXIS = "tensor"


def ambient_mesh() -> Optional[jax.sharding.AbstractMesh]:
    """The mesh set with `jax.set_mesh`, or None when there is none or it has one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def batch_axes(mesh, rows: int) -> tuple[str, ...]:
    """The data-parallel axes (in order) whose product divides `rows`."""
    chosen: list[str] = []
    for axis in BATCH_AXES:
        size = mesh.shape.get(axis, 1)
        if size > 1 and rows % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
            chosen.append(axis)
    return tuple(chosen)


def tensor_axis(mesh, *sizes: int) -> Optional[str]:
    """`tensor` when it exists with size > 1 and divides every one of `sizes`."""
    size = mesh.shape.get(TENSOR_AXIS, 1)
    return TENSOR_AXIS if size > 1 and all(s % size == 0 for s in sizes) else None


def per_shard(fn: Callable, mesh, in_specs, out_specs) -> Callable:
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
