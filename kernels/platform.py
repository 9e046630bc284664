"""Which kernel family serves the devices being compiled for.

The target is the platform of the mesh the step is traced under (`compile_target`, entered with the mesh
by `maxdpo.sharding.mesh_context`), so a CPU process compiling for TPU or GPU topologies picks the Mosaic or
Triton kernels; without one, the process's default backend decides (tests, single-device use).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import jax

_TARGET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("maxdpo_kernel_target", default=None)


@contextlib.contextmanager
def compile_target(platform: str) -> Iterator[None]:
    """Kernels traced inside are built for `platform` ('tpu', 'gpu'/'cuda'/'rocm', 'cpu'): a device's
    `.platform`, whatever the host's backend is."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def default_backend() -> tuple[str, bool]:
    """(kernel family, interpret): TPU -> Mosaic, GPU -> Triton, anything else -> GPU kernels interpreted."""
    platform = _TARGET.get() or jax.default_backend()
    if platform == "tpu":
        return "tpu", False
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu", False
    return "gpu", True
