"""Sparse mixture-of-experts MLP (Mixtral): softmax router, top-k experts, renormalised weights.

Interchangeable expert computations behind `model.moe_impl`: `dense` runs every expert on every token
and zeroes the unselected ones (the reference), `ragged` sorts the token copies by expert and runs
`jax.lax.ragged_dot` over the groups, `pallas` dispatches the copies into expert-owned row tiles and
runs the Pallas grouped matmul (both dropless, k/E of the dense FLOPs). LoRA adapters on the experts
(`ExpertAdapters`) run through the same grouped products at rank r, never forming W + A B; the frozen base
weights' gradients are not differentiated (the Pallas path's custom backward computes one, left to XLA to
drop as unused).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from maxdpo.kernels import moe_routing, partitioning
from maxdpo.kernels.grouped_matmul import default_tile, grouped_matmul
from maxdpo.models.layers import ACTIVATIONS, add_adapters, make_param, project, quantize_weights, weight
from maxdpo.models.lora import EXPERT_ADAPTERS, make_adapters
from maxdpo.models.spec import Architecture, Execution


def route(router_logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(probs [N, E] fp32, chosen experts [N, k], their weights renormalised to sum 1 [N, k] fp32)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    return probs, experts, weights / jnp.sum(weights, axis=-1, keepdims=True)


def balance_statistics(probs: jax.Array, experts: jax.Array, token_mask: jax.Array) -> jax.Array:
    """[2, E]: top-k assignments per expert and summed router probability per expert, over real tokens.

    Summed over layers and turned into the Switch-Transformer loss by `load_balancing_loss`.
    """
    num_experts = probs.shape[-1]
    assigned = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=1)  # [N, E]
    return jnp.stack([token_mask @ assigned, token_mask @ probs])


def load_balancing_loss(statistics: jax.Array, num_rows: jax.Array) -> jax.Array:
    """transformers' `load_balancing_loss_func`: E * sum_e (assignments_e / rows) * (prob_e / rows).

    statistics [2, E] summed over layers; num_rows = real tokens x layers.
    """
    tokens_per_expert, prob_per_expert = statistics / num_rows
    return statistics.shape[-1] * jnp.sum(tokens_per_expert * prob_per_expert)


class ExpertAdapters(NamedTuple):
    """LoRA on one layer's experts in the compute dtype, B already scaled; None where there is none. Gate and up
    share A, as PEFT adapts transformers' fused `gate_up_proj`."""
    gate_up_a: Optional[jax.Array] = None  # [E, D, r]
    gate_up_b: Optional[jax.Array] = None  # [E, r, 2, F]: gate's, then up's
    down_a: Optional[jax.Array] = None  # [E, F, r]
    down_b: Optional[jax.Array] = None  # [E, r, D]

    def gate_up(self, x, gate_x, up_x, first: Callable, then: Callable):
        """(gate_x, up_x) plus x A B_gate and x A B_up; `first`/`then`: the grouped products by A and by B."""
        if self.gate_up_a is None:
            return gate_x, up_x
        xa = first(x, self.gate_up_a)  # [rows, (E,) r]
        return gate_x + then(xa, self.gate_up_b[:, :, 0]), up_x + then(xa, self.gate_up_b[:, :, 1])

    def down(self, hidden, out, matmul: Callable):
        """out plus hidden A B of the down projection."""
        if self.down_a is None:
            return out
        return out + matmul(matmul(hidden, self.down_a), self.down_b)


def dense_experts(x, experts, weights, gate, up, down, activation: Callable,
                  adapters: ExpertAdapters = ExpertAdapters()) -> jax.Array:
    """Every expert on every token. x [N, D]; experts, weights [N, k]; gate, up [E, D, F]; down [E, F, D]."""
    num_experts = gate.shape[0]
    combine = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * weights[..., None], axis=1)  # [N, E]
    from_tokens = functools.partial(jnp.einsum, "ND,EDF->NEF")
    per_expert = functools.partial(jnp.einsum, "NEF,EFD->NED")
    gate_x, up_x = adapters.gate_up(x, from_tokens(x, gate), from_tokens(x, up), from_tokens, per_expert)
    hidden = activation(gate_x) * up_x  # [N, E, F]
    out = adapters.down(hidden, per_expert(hidden, down), per_expert)  # [N, E, D]
    return jnp.einsum("NED,NE->ND", out, combine.astype(out.dtype))


def ragged_experts(x, experts, weights, gate, up, down, activation: Callable,
                   adapters: ExpertAdapters = ExpertAdapters()) -> jax.Array:
    """Token copies sorted by expert, one `ragged_dot` per projection over the expert groups."""
    num_tokens, top_k = experts.shape
    num_experts = gate.shape[0]
    flat_experts = experts.reshape(-1)  # [N*k]
    order = jnp.argsort(flat_experts, stable=True)  # [N*k], sorted position -> (token, slot)
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)  # [E]
    tokens = x[order // top_k]  # [N*k, D]
    gmm = functools.partial(jax.lax.ragged_dot, group_sizes=group_sizes)
    gate_x, up_x = adapters.gate_up(tokens, gmm(tokens, gate), gmm(tokens, up), gmm, gmm)
    hidden = activation(gate_x) * up_x  # [N*k, F]
    out = adapters.down(hidden, gmm(hidden, down), gmm)  # [N*k, D]
    out = out[jnp.argsort(order)].reshape(num_tokens, top_k, -1)  # [N, k, D], back to (token, slot)
    return jnp.einsum("NKD,NK->ND", out, weights.astype(out.dtype))


def pallas_experts(x, experts, weights, gate, up, down, activation: Callable,
                   adapters: ExpertAdapters = ExpertAdapters(), *, backend: Optional[str] = None,
                   interpret: Optional[bool] = None, tile: Optional[int] = None) -> jax.Array:
    """Copies permuted into expert-owned tiles, three Pallas grouped matmuls, weighted combine.

    backend/interpret/tile default to the platform's kernels (tests and benchmarks pick them). Under a
    mesh it runs per shard, split as the logical rules map `batch` (tokens) and `mlp` (the width; partial
    outputs summed, so it never reuses a token axis); expert weights are gathered over the other axes
    (no expert parallelism here).
    """
    local = functools.partial(_local_pallas_experts, activation=activation, backend=backend,
                              interpret=interpret, tile=tile)
    mesh = partitioning.ambient_mesh()
    if mesh is None:
        return local(x, experts, weights, gate, up, down, adapters)
    rows, width = partitioning.kernel_axes(mesh, ("batch", "mlp"), (x.shape[0], gate.shape[2]))  # [N], [F]
    if width:
        partial_sums = local
        local = lambda *args: jax.lax.psum(partial_sums(*args), width)  # noqa: E731
    tokens = P(rows, None)
    adapter_specs = ExpertAdapters(P(), P(None, None, None, width), P(None, width, None), P())
    return partitioning.per_shard(local, mesh, (tokens, tokens, tokens, P(None, None, width), P(None, None, width),
                                                P(None, width, None), adapter_specs), tokens)(
        x, experts, weights, gate, up, down, adapters)


def _local_pallas_experts(x, experts, weights, gate, up, down, adapters, *, activation, backend, interpret, tile):
    tile = tile or default_tile(backend)
    dispatch = moe_routing.plan(experts, gate.shape[0], tile)
    tokens = moe_routing.permute(x, dispatch, experts.shape[1])  # [M, D]
    gmm = functools.partial(grouped_matmul, dispatch=dispatch, tile=tile, backend=backend, interpret=interpret)
    gate_x, up_x = adapters.gate_up(tokens, gmm(tokens, gate), gmm(tokens, up), gmm, gmm)
    hidden = activation(gate_x) * up_x  # [M, F]
    return moe_routing.combine(adapters.down(hidden, gmm(hidden, down), gmm), dispatch, weights)


EXPERT_IMPLEMENTATIONS = {"dense": dense_experts, "ragged": ragged_experts, "pallas": pallas_experts}


class MoE(nnx.Module):
    """Router [D, E] and per-expert gated MLPs; returns (output [B, T, D], balance statistics [2, E])."""

    def __init__(self, spec: Architecture, execution: Execution, rngs: nnx.Rngs, num_layers: Optional[int] = None):
        d, f, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
        init = dict(rngs=rngs, dtype=execution.param_dtype, stddev=spec.initializer_range, num_layers=num_layers)
        self.router = make_param(shape=(d, e), axes=("embed", None), **init)
        self.gate_proj = make_param(shape=(e, d, f), axes=("experts", "embed", "mlp"), **init)
        self.up_proj = make_param(shape=(e, d, f), axes=("experts", "embed", "mlp"), **init)
        self.down_proj = make_param(shape=(e, f, d), axes=("experts", "mlp", "embed"), **init)
        add_adapters(self, "layers/mlp", {"router": 1}, execution, rngs, num_layers)
        lead = int(num_layers is not None) + 1  # the layers axis (when stacked) and the experts
        for adapter, base in (("experts_gate_up", self.gate_proj), ("experts_down", self.down_proj)):
            path = f"layers/mlp/{adapter}"
            if self.lora and self.lora.adapts(path):
                a, b = make_adapters(rngs, base, 1, self.lora.rank, lead, len(EXPERT_ADAPTERS[path]))
                setattr(self, f"{adapter}_lora_a", a)
                setattr(self, f"{adapter}_lora_b", b)
        quantize_weights(self, ("gate_proj", "up_proj", "down_proj"), execution)
        self.top_k = spec.num_experts_per_tok
        self.hidden_act = spec.hidden_act
        self.impl = execution.moe_impl

    def __call__(self, x: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D]; token_mask [B, T] (1 for real tokens, used by the balance statistics only)."""
        if self.impl not in EXPERT_IMPLEMENTATIONS:
            raise ValueError(f"unknown moe_impl {self.impl!r}; available: {sorted(EXPERT_IMPLEMENTATIONS)}")
        batch, seq, hidden = x.shape
        dtype = x.dtype
        flat = x.reshape(batch * seq, hidden)  # [N, D]
        router_logits = project(self, "router", flat)  # [N, E]
        probs, experts, weights = route(router_logits, self.top_k)
        out = EXPERT_IMPLEMENTATIONS[self.impl](
            flat, experts, weights, *(weight(self, name, dtype) for name in ("gate_proj", "up_proj", "down_proj")),
            ACTIVATIONS[self.hidden_act], self._expert_adapters(dtype))
        statistics = balance_statistics(probs, experts, token_mask.reshape(-1).astype(jnp.float32))
        return out.astype(dtype).reshape(batch, seq, hidden), statistics

    def _expert_adapters(self, dtype) -> ExpertAdapters:
        def pair(name):
            if not hasattr(self, f"{name}_lora_a"):
                return None, None
            a, b = getattr(self, f"{name}_lora_a")[...], getattr(self, f"{name}_lora_b")[...]
            return a.astype(dtype), (self.lora.scale * b).astype(dtype)
        return ExpertAdapters(*pair("experts_gate_up"), *pair("experts_down"))
