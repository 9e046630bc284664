"""Decoder building blocks: RMSNorm, rotary embeddings (default and llama3 scaling), attention, gated MLP.

Parameters carry `logical_axes` metadata; `maxdpo.sharding` maps those names to mesh axes. Stacked
(scanned) layers add a leading `layers` axis. Numerics follow Hugging Face `transformers`.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxdpo.kernels import dot_product_attention
from maxdpo.kernels.attention_reference import cached_attention
from maxdpo.models import nf4
from maxdpo.models.lora import make_adapters
from maxdpo.models.spec import Architecture, Execution


def make_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[Optional[str], ...], dtype, stddev: float,
               num_layers: Optional[int] = None) -> nnx.Param:
    """A normal(0, stddev) parameter (HF's init); a leading `layers` axis when `num_layers` is set."""
    if num_layers is not None:
        shape, axes = (num_layers, *shape), ("layers", *axes)
    value = stddev * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=axes)


def constant_param(shape: tuple[int, ...], axes: tuple[Optional[str], ...], dtype,
                   num_layers: Optional[int] = None, fill: float = 1.0) -> nnx.Param:
    """A parameter filled with `fill` (norm scales); a leading `layers` axis when `num_layers` is set."""
    if num_layers is not None:
        shape, axes = (num_layers, *shape), ("layers", *axes)
    return nnx.Param(jnp.full(shape, fill, dtype), logical_axes=axes)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


def token_matmul(x: jax.Array, w: jax.Array, contract: int = 1, preferred_element_type=None) -> jax.Array:
    """x [*tokens, *w.shape[:contract]] contracted with the leading `contract` dims of w -> [*tokens,
    *w.shape[contract:]], computed as one [tokens, in] @ [in, out] matmul. XLA:CPU lays out the backward pass
    of a batched-token einsum ("BTD,DF->BTF") with strided transposes that cost as much as the matmuls (the
    ~50M Llama's MLP forward + backward: 0.63 s as an einsum, 0.29 s flat); elsewhere the reshapes are free."""
    in_shape, out_shape = w.shape[:contract], w.shape[contract:]
    tokens = x.shape[:x.ndim - contract]
    flat = jnp.dot(x.reshape(-1, math.prod(in_shape)), w.reshape(math.prod(in_shape), -1),
                   preferred_element_type=preferred_element_type)  # [tokens, out]
    return flat.reshape(*tokens, *out_shape)


def add_adapters(module: nnx.Module, prefix: str, weights: dict[str, int], execution: Execution, rngs: nnx.Rngs,
                 num_layers: Optional[int]) -> None:
    """LoRA A and B beside each of `weights` ({name: input dims}) that `execution.lora` adapts at `prefix/name`."""
    module.lora = execution.lora
    for name, contract in weights.items():
        if execution.lora and execution.lora.adapts(f"{prefix}/{name}"):
            a, b = make_adapters(rngs, getattr(module, name), contract, execution.lora.rank,
                                 lead=int(num_layers is not None))
            setattr(module, f"{name}_lora_a", a)
            setattr(module, f"{name}_lora_b", b)


def quantize_weights(module: nnx.Module, names: tuple[str, ...], execution: Execution) -> None:
    """With `execution.quantize` ("nf4"), replaces each weight of `names` [layers, ...] by its NF4 codes and
    block scales per layer (`name_nf4`, `name_absmax`); `module.nf4_shapes` keeps the per-layer shapes."""
    module.nf4_shapes = ()
    if execution.quantize != "nf4":
        return
    shapes = []
    for name in names:
        weight = getattr(module, name).get_value()  # [layers, ...]
        codes, absmax = jax.vmap(nf4.quantize)(weight)
        setattr(module, f"{name}_nf4", nnx.Param(codes, logical_axes=("layers", None)))
        setattr(module, f"{name}_absmax", nnx.Param(absmax, logical_axes=("layers", None)))
        delattr(module, name)
        shapes.append((name, weight.shape[1:]))
    module.nf4_shapes = tuple(shapes)


def weight(module: nnx.Module, name: str, dtype) -> jax.Array:
    """The module's weight `name` in `dtype`, dequantised from NF4 where it is stored so."""
    shape = dict(module.nf4_shapes).get(name)
    if shape is None:
        return getattr(module, name)[...].astype(dtype)
    return nf4.dequantize(getattr(module, f"{name}_nf4")[...], getattr(module, f"{name}_absmax")[...], shape, dtype)


def project(module: nnx.Module, name: str, x: jax.Array, contract: int = 1) -> jax.Array:
    """x times the module's weight `name` in x's dtype (`token_matmul`; dequantised when stored NF4), plus
    scale * (x A) B where the weight carries LoRA adapters."""
    dtype = x.dtype
    y = token_matmul(x, weight(module, name, dtype), contract)
    if module.lora is None or not hasattr(module, f"{name}_lora_a"):
        return y
    a = getattr(module, f"{name}_lora_a")[...].astype(dtype)  # [*in, r]
    b = getattr(module, f"{name}_lora_b")[...].astype(dtype)  # [r, *out]
    return y + module.lora.scale * token_matmul(token_matmul(x, a, contract), b)


def is_norm_scale(path) -> bool:
    """Whether a parameter's tree path (jax key path) leads to a norm's scale."""
    return any("norm" in str(getattr(key, "key", "")) for key in path)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale in fp32, with transformers' cast order: Llama casts before scaling; Gemma
    stores w and scales by (1 + w) in fp32 before casting."""

    def __init__(self, spec: Architecture, param_dtype, num_layers: Optional[int] = None):
        self.eps = spec.rms_norm_eps
        self.plus_one = spec.norm_plus_one
        fill = 0.0 if spec.norm_plus_one else 1.0
        self.scale = constant_param((spec.hidden_size,), ("embed",), param_dtype, num_layers, fill)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_inverse_frequencies(spec: Architecture) -> np.ndarray:
    """inv_freq [head_dim // 2], with the `llama3` frequency-dependent scaling when configured."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = dict(spec.rope_scaling or ())
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq.astype(np.float32)
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, llama3)")
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates halves of the head dimension (HF's `rotate_half` layout). x: [B, T, N, H]; positions: [B, T]."""
    angles = positions[:, :, None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None, :]  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions; optional sliding window and logit soft-cap."""

    def __init__(self, spec: Architecture, execution: Execution, rngs: nnx.Rngs, num_layers: Optional[int] = None):
        d, n, k, h = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        init = dict(rngs=rngs, dtype=execution.param_dtype, stddev=spec.initializer_range, num_layers=num_layers)
        self.q_proj = make_param(shape=(d, n, h), axes=("embed", "heads", "head_dim"), **init)
        self.k_proj = make_param(shape=(d, k, h), axes=("embed", "kv_heads", "head_dim"), **init)
        self.v_proj = make_param(shape=(d, k, h), axes=("embed", "kv_heads", "head_dim"), **init)
        self.o_proj = make_param(shape=(n, h, d), axes=("heads", "head_dim", "embed"), **init)
        add_adapters(self, "layers/attn", {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2}, execution, rngs,
                     num_layers)
        quantize_weights(self, ("q_proj", "k_proj", "v_proj", "o_proj"), execution)
        self.spec = spec
        self.impl = execution.attention

    def _rotated_qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q = project(self, "q_proj", x)  # [B, T, N, H]
        k = project(self, "k_proj", x)  # [B, T, K, H]
        v = project(self, "v_proj", x)  # [B, T, K, H]
        inv_freq = rope_inverse_frequencies(self.spec)
        return apply_rotary(q, positions, inv_freq), apply_rotary(k, positions, inv_freq), v

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 sliding_window: Optional[int] = None, shared_prefix: bool = False) -> jax.Array:
        """shared_prefix: rows in the prefix-sharing layout (segment ids per `attention_blocks.PREFIX_GROUP`)."""
        q, k, v = self._rotated_qkv(x, positions)
        out = dot_product_attention(
            q, k, v, impl=self.impl, q_positions=positions, kv_positions=positions,
            q_segment_ids=segment_ids, kv_segment_ids=segment_ids, scale=self.spec.attention_scale,
            sliding_window=sliding_window, logit_softcap=self.spec.attn_logit_softcap,
            shared_prefix=shared_prefix)
        return project(self, "o_proj", out, contract=2)  # [B, T, D]

    def decode(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, sliding_window: Optional[int],
               cache: LayerCache) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attention of new tokens x [B, T, D] over the cached keys and values and their own (plain JAX: a few
        query rows); returns (out [B, T, D], the new tokens' keys and values [B, T, K, H] in the cache's
        dtype, for the caller to write at the cache's index)."""
        q, k, v = self._rotated_qkv(x, positions)
        out = cached_attention(q, k, v, cache.k, cache.v, q_positions=positions, q_segment_ids=segment_ids,
                               cache_positions=cache.positions, cache_segment_ids=cache.segment_ids,
                               scale=self.spec.attention_scale, sliding_window=sliding_window,
                               logit_softcap=self.spec.attn_logit_softcap)
        return project(self, "o_proj", out, contract=2), (k.astype(cache.k.dtype), v.astype(cache.v.dtype))


class LayerCache(NamedTuple):
    """One layer's view of the decode cache before this step: its keys and values [B, S, K, H], the key
    positions and segment ids [B, S] (0: an empty slot, or padding)."""
    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (Llama, Mistral) or GeGLU with tanh gelu (Gemma)."""

    def __init__(self, spec: Architecture, execution: Execution, rngs: nnx.Rngs, num_layers: Optional[int] = None):
        d, f = spec.hidden_size, spec.intermediate_size
        init = dict(rngs=rngs, dtype=execution.param_dtype, stddev=spec.initializer_range, num_layers=num_layers)
        self.gate_proj = make_param(shape=(d, f), axes=("embed", "mlp"), **init)
        self.up_proj = make_param(shape=(d, f), axes=("embed", "mlp"), **init)
        self.down_proj = make_param(shape=(f, d), axes=("mlp", "embed"), **init)
        add_adapters(self, "layers/mlp", {"gate_proj": 1, "up_proj": 1, "down_proj": 1}, execution, rngs, num_layers)
        quantize_weights(self, ("gate_proj", "up_proj", "down_proj"), execution)
        self.hidden_act = spec.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = project(self, "gate_proj", x)  # [B, T, F]
        up = project(self, "up_proj", x)  # [B, T, F]
        return project(self, "down_proj", ACTIVATIONS[self.hidden_act](gate) * up)  # [B, T, D]
