"""Attention and MoE kernels (imported as `maxdpo.kernels`); each has a plain-JAX reference beside it."""
from maxdpo.kernels.attention_reference import attention_reference, dot_product_attention

__all__ = ["attention_reference", "dot_product_attention"]
