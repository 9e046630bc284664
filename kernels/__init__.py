"""Attention and MoE kernels (imported as `maxdpo.kernels`); each has a plain-JAX reference beside it."""
from maxdpo.kernels.attention_reference import attention_reference
from maxdpo.kernels.flash_attention import flash_attention

ATTENTION_IMPLEMENTATIONS = {"xla": attention_reference, "pallas": flash_attention}


def dot_product_attention(q, k, v, *, impl: str = "xla", **kwargs):
    """Dispatches on `model.attention`: `xla` (the plain-JAX reference) or `pallas` (flash attention)."""
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; available: {sorted(ATTENTION_IMPLEMENTATIONS)}")
    return ATTENTION_IMPLEMENTATIONS[impl](q, k, v, **kwargs)


__all__ = ["ATTENTION_IMPLEMENTATIONS", "attention_reference", "dot_product_attention", "flash_attention"]
