"""Logical-axis rules -> mesh axes, and running a kernel once per shard under the ambient mesh.

A Pallas call is an opaque custom call to XLA's partitioner, which would gather its inputs and run it
whole on every device. Under a mesh (`jax.set_mesh`) the kernels are wrapped in `shard_map` instead,
their dimensions split as the logical rules say (`logical_rules`, set with the mesh by
`maxdpo.sharding.mesh_context`;
`DEFAULT_RULES` otherwise). Arrays sharded otherwise are resharded at the boundary. `dim_axes` is the
one rule -> mesh-axes mapping, also behind the parameter and batch shardings (`maxdpo.sharding`).

Rules are read while tracing: a function jitted under one set of rules keeps them for later calls.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, Optional, Sequence

import jax
from jax.sharding import PartitionSpec

Rules = Mapping[str, Sequence[str]]  # logical name -> mesh axes, outermost first

# The logical names the kernels read, as in configs/base.yaml.
DEFAULT_RULES: Rules = MappingProxyType({"batch": ("data", "fsdp", "expert"), "heads": ("tensor",),
                                         "kv_heads": ("tensor",), "mlp": ("tensor",)})

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("maxdpo_logical_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def logical_rules(rules: Rules) -> Iterator[None]:
    """Kernels traced inside split their dimensions by `rules` (e.g. `cfg.mesh.logical_axis_rules`)."""
    token = _RULES.set(MappingProxyType(dict(rules)))
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> Rules:
    """The rules of the innermost `logical_rules`, else `DEFAULT_RULES`."""
    return _RULES.get()


def dim_axes(names: Sequence[Optional[str]], rules: Rules, mesh,
             shape: Optional[Sequence[int]] = None) -> tuple[tuple[str, ...], ...]:
    """Mesh axes splitting each dimension of an array whose dimensions carry the logical `names`.

    Each name takes its rule's axes in order, skipping axes of size 1, axes an earlier dimension took,
    and (given `shape`) axes that would make the running product stop dividing the dimension.
    """
    used: set[str] = set()
    per_dim = []
    for dim, name in enumerate(names):
        chosen: list[str] = []
        for axis in (rules.get(name) or ()) if name is not None else ():
            if axis in used or mesh.shape[axis] == 1:
                continue
            if shape is not None and shape[dim] % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]):
                continue
            chosen.append(axis)
        used.update(chosen)
        per_dim.append(tuple(chosen))
    return tuple(per_dim)


def logical_to_spec(names: Sequence[Optional[str]], rules: Rules, mesh,
                    shape: Optional[Sequence[int]] = None) -> PartitionSpec:
    """PartitionSpec for one array whose dimensions carry the logical `names` (see `dim_axes`)."""
    return PartitionSpec(*dim_axes(names, rules, mesh, shape))


def kernel_axes(mesh, names: Sequence[Optional[str]], shape: Sequence[int]) -> tuple[tuple[str, ...], ...]:
    """`dim_axes` under the current rules: how a kernel splits an array (or several sharing mesh axes)."""
    return dim_axes(names, current_rules(), mesh, shape)


def ambient_mesh() -> Optional[jax.sharding.AbstractMesh]:
    """The mesh set with `jax.set_mesh`, or None when there is none or it has one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def per_shard(fn: Callable, mesh, in_specs, out_specs) -> Callable:
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
