"""The shared decoder: embeddings, a stack of pre-norm blocks (scanned over a `layers` axis), final norm, LM head.

Families differ only by their Architecture and the small pieces their modules pass in; `Execution` says how
to run it (dtypes, kernels, remat, scan).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from maxdpo.models.layers import Attention, GatedMLP, RMSNorm, make_param, token_matmul
from maxdpo.models.moe import MoE, load_balancing_loss
from maxdpo.models.spec import Architecture, Execution

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """x + attn(norm(x)), then + mlp(norm(x)); Gemma-2 also normalises each branch's output. Built with a
    leading `layers` axis on every parameter. The MLP is a sparse MoE when `spec.num_experts` > 0."""

    def __init__(self, spec: Architecture, execution: Execution, rngs: nnx.Rngs, num_layers: int):
        param_dtype = execution.param_dtype
        self.attn_norm = RMSNorm(spec, param_dtype, num_layers)
        self.attn = Attention(spec, execution, rngs, num_layers)
        self.mlp_norm = RMSNorm(spec, param_dtype, num_layers)
        mlp = MoE if spec.num_experts else GatedMLP
        self.mlp = mlp(spec, execution, rngs, num_layers)
        if spec.post_norms:
            self.post_attn_norm = RMSNorm(spec, param_dtype, num_layers)
            self.post_mlp_norm = RMSNorm(spec, param_dtype, num_layers)
        self.post_norms = spec.post_norms
        self.is_moe = bool(spec.num_experts)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 sliding_window: Optional[int], shared_prefix: bool) -> tuple[jax.Array, Optional[jax.Array]]:
        """Returns (x [B, T, D], MoE balance statistics [2, E] or None)."""
        h = self.attn(self.attn_norm(x), positions, segment_ids, sliding_window, shared_prefix)
        x = x + (self.post_attn_norm(h) if self.post_norms else h)
        h = self.mlp_norm(x)
        statistics = None
        if self.is_moe:
            h, statistics = self.mlp(h, segment_ids > 0)
        else:
            h = self.mlp(h)
        return x + (self.post_mlp_norm(h) if self.post_norms else h), statistics


def layer_period(windows: tuple[Optional[int], ...]) -> int:
    """Smallest p with windows[i] == windows[i % p]: layers are scanned in groups of p (Gemma-2: 2), so each
    layer's window is static inside the group."""
    for period in range(1, len(windows) + 1):
        if all(w == windows[i % period] for i, w in enumerate(windows)):
            return period
    return len(windows)


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__` maps token ids [batch, seq] to fp32 logits [batch, seq, vocab]."""

    def __init__(self, spec: Architecture, rngs: nnx.Rngs, execution: Execution = Execution()):
        self.spec = spec
        self.execution = execution
        self.embed = make_param(rngs, (spec.vocab_size, spec.hidden_size), ("vocab", "embed"),
                                execution.param_dtype, spec.initializer_range)
        self.layers = Block(spec, execution, rngs, spec.num_layers)
        self.final_norm = RMSNorm(spec, execution.param_dtype)
        if not spec.tie_word_embeddings:
            self.lm_head = make_param(rngs, (spec.hidden_size, spec.vocab_size), ("embed", "vocab"),
                                      execution.param_dtype, spec.initializer_range)

    def _run_layers(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, shared_prefix: bool
                    ) -> tuple[jax.Array, list[jax.Array]]:
        """Runs every layer; returns (x, the MoE statistics of each layer or scanned group of layers)."""
        spec, execution = self.spec, self.execution
        graphdef, stacked = nnx.split(self.layers)
        windows = spec.layer_windows()

        def make_layer(window):
            # The layer's weights are sliced out of the stack inside the (checkpointed) layer: the backward pass
            # then slices them again instead of the forward scan saving a stacked copy of every weight.
            def layer(h, all_layers, index):
                layer_state = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, index, keepdims=False),
                                           all_layers)
                return nnx.merge(graphdef, layer_state)(h, positions, segment_ids, window, shared_prefix)
            if execution.remat == "none":
                return layer
            return jax.checkpoint(layer, policy=REMAT_POLICIES[execution.remat], prevent_cse=not execution.scan_layers)

        layer_fns = {window: make_layer(window) for window in set(windows)}
        statistics = []

        def apply(h, window_index, index):
            h, stats = layer_fns[windows[window_index]](h, stacked, index)
            return h, [] if stats is None else [stats]

        if not execution.scan_layers:
            for index in range(spec.num_layers):
                x, stats = apply(x, index, index)
                statistics += stats
            return x, statistics

        period = layer_period(windows)
        groups = spec.num_layers // period

        def group(h, group_index):
            group_stats = []
            for offset in range(period):
                h, stats = apply(h, offset, group_index * period + offset)
                group_stats += stats
            return h, group_stats

        x, scanned_stats = jax.lax.scan(group, x, jnp.arange(groups))
        statistics += [jnp.sum(stats, axis=0) for stats in scanned_stats]
        for index in range(groups * period, spec.num_layers):  # layers past the last whole group
            x, stats = apply(x, index, index)
            statistics += stats
        return x, statistics

    def hidden_states(self, input_ids: jax.Array, positions: Optional[jax.Array] = None,
                      segment_ids: Optional[jax.Array] = None, attention_mask: Optional[jax.Array] = None,
                      shared_prefix: bool = False) -> tuple[jax.Array, jax.Array]:
        """(final-norm hidden states [B, T, D], router load-balancing loss as transformers computes it; 0
        without MoE). input_ids [B, T]; positions [B, T] (default 0..T-1); segment_ids [B, T] (0 = padding)
        or an attention_mask [B, T] of 1/0 as in transformers; shared_prefix: rows laid out
        prompt | chosen | rejected (`maxdpo.data.prefix_sharing`)."""
        spec, dtype = self.spec, self.execution.dtype
        batch, seq = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        if segment_ids is None:
            segment_ids = (jnp.ones((batch, seq), jnp.int32) if attention_mask is None
                           else attention_mask.astype(jnp.int32))
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(dtype)  # [B, T, D]
        if spec.scale_embeddings:
            x = x * jnp.asarray(spec.hidden_size ** 0.5, dtype)
        x, statistics = self._run_layers(x, positions, segment_ids, shared_prefix)
        aux_loss = jnp.zeros((), jnp.float32)
        if statistics:
            num_rows = jnp.sum(segment_ids > 0).astype(jnp.float32) * spec.num_layers
            aux_loss = load_balancing_loss(sum(statistics), num_rows)
        return self.final_norm(x), aux_loss

    def vocab_projection(self) -> Callable[[jax.Array], jax.Array]:
        """hidden [..., D] -> fp32 logits [..., V] (tied or separate head, final soft-cap)."""
        spec = self.spec
        head = self.embed[...].T if spec.tie_word_embeddings else self.lm_head[...]
        head = head.astype(self.execution.dtype)  # [D, V]

        def project(x: jax.Array) -> jax.Array:
            logits = token_matmul(x, head, preferred_element_type=jnp.float32)  # [..., V]
            if spec.final_logit_softcap is not None:
                logits = jnp.tanh(logits / spec.final_logit_softcap) * spec.final_logit_softcap
            return logits
        return project

    def forward(self, input_ids: jax.Array, positions: Optional[jax.Array] = None,
                segment_ids: Optional[jax.Array] = None, attention_mask: Optional[jax.Array] = None
                ) -> tuple[jax.Array, jax.Array]:
        """(logits [B, T, V] fp32, router load-balancing loss); arguments as `hidden_states`."""
        hidden, aux_loss = self.hidden_states(input_ids, positions, segment_ids, attention_mask)
        return self.vocab_projection()(hidden), aux_loss

    def __call__(self, input_ids: jax.Array, positions: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """Logits [B, T, V] in float32 (see `forward`)."""
        return self.forward(input_ids, positions, segment_ids, attention_mask)[0]


def logical_axes_of(state: nnx.State) -> dict:
    """Nested dict of each parameter's `logical_axes` metadata."""
    def axes(variable):
        return variable.get_metadata().get("logical_axes")
    return nnx.to_pure_dict(jax.tree.map(axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def abstract_model(spec: Architecture, execution: Execution = Execution()) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params as ShapeDtypeStructs, each parameter's logical axes), allocating nothing."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(spec, nnx.Rngs(0), execution)))
    return graphdef, nnx.to_pure_dict(state), logical_axes_of(state)
