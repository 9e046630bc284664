"""Which kernel family serves the current JAX backend."""
from __future__ import annotations

import jax


def default_backend() -> tuple[str, bool]:
    """(kernel family, interpret): TPU -> Mosaic, GPU -> Triton, anything else -> GPU kernels interpreted."""
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu", False
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu", False
    return "gpu", True
