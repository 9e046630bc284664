"""The shared decoder: embeddings, a stack of pre-norm blocks (scanned over a `layers` axis), final norm, LM head.

Families differ only by their Architecture and the small pieces their modules pass in; `Execution` says how
to run it (dtypes, kernels, remat, scan).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from maxdpo.models.layers import Attention, GatedMLP, LayerCache, RMSNorm, make_param, token_matmul
from maxdpo.models.moe import MoE, load_balancing_loss
from maxdpo.models.spec import Architecture, Execution

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
    """Keys and values of every layer [L, B, S, K, H]; the positions and segment ids of the cached tokens
    [B, S] (0: an empty slot, or padding); `length`: slots filled (the next tokens' index)."""
    k: jax.Array
    v: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    length: jax.Array


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
        return self._mlp_residual(x + (self.post_attn_norm(h) if self.post_norms else h), segment_ids)

    def decode(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, sliding_window: Optional[int],
               cache: LayerCache) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The block on new tokens x [B, T, D] against the decode cache; (x, this layer's new keys and values)."""
        h, kv = self.attn.decode(self.attn_norm(x), positions, segment_ids, sliding_window, cache)
        return self._mlp_residual(x + (self.post_attn_norm(h) if self.post_norms else h), segment_ids)[0], kv

    def _mlp_residual(self, x: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, Optional[jax.Array]]:
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
        spec = self.spec
        batch, seq = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        if segment_ids is None:
            segment_ids = (jnp.ones((batch, seq), jnp.int32) if attention_mask is None
                           else attention_mask.astype(jnp.int32))
        x, statistics = self._run_layers(self._embed(input_ids), positions, segment_ids, shared_prefix)
        aux_loss = jnp.zeros((), jnp.float32)
        if statistics:
            num_rows = jnp.sum(segment_ids > 0).astype(jnp.float32) * spec.num_layers
            aux_loss = load_balancing_loss(sum(statistics), num_rows)
        return self.final_norm(x), aux_loss

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] ids -> [B, T, D] in the compute dtype (Gemma scales by sqrt(D))."""
        dtype = self.execution.dtype
        x = jnp.take(self.embed[...], input_ids, axis=0).astype(dtype)  # [B, T, D]
        if self.spec.scale_embeddings:
            x = x * jnp.asarray(self.spec.hidden_size ** 0.5, dtype)
        return x

    def decode(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: KVCache) -> tuple[jax.Array, KVCache]:
        """New tokens [B, T] (a left-padded prompt, then one token a step) at `positions` [B, T] with segment
        ids [B, T] (1, 0 on padding), attending to the cache: (fp32 logits of the last position [B, V], the
        cache with their keys and values)."""
        spec, index = self.spec, cache.length
        kv_positions = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, index, axis=1)
        kv_segments = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, index, axis=1)
        graphdef, stacked = nnx.split(self.layers)
        windows = spec.layer_windows()

        def layer(h, layer_index, window, k, v):
            layer_state = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, layer_index, keepdims=False),
                                       stacked)
            return nnx.merge(graphdef, layer_state).decode(h, positions, segment_ids, window,
                                                           LayerCache(k, v, kv_positions, kv_segments, index))

        x, period = self._embed(input_ids), layer_period(windows)
        if spec.num_layers % period:  # windows with no period: every layer in turn
            new = [None] * spec.num_layers
            for i in range(spec.num_layers):
                x, new[i] = layer(x, i, windows[i], cache.k[i], cache.v[i])
            keys, values = (jnp.stack([kv[i] for kv in new]) for i in (0, 1))
        else:
            groups = spec.num_layers // period

            def group(h, inputs):  # a scan over groups of `period` layers, each window static in its group
                group_index, k, v = inputs  # k, v [period, B, S, K, H]
                kvs = []
                for offset in range(period):
                    h, kv = layer(h, group_index * period + offset, windows[offset], k[offset], v[offset])
                    kvs.append(kv)
                return h, tuple(jnp.stack([kv[i] for kv in kvs]) for i in (0, 1))

            def grouped(t):  # [L, ...] -> [L / period, period, ...]
                return t.reshape(groups, period, *t.shape[1:])
            x, (keys, values) = jax.lax.scan(group, x, (jnp.arange(groups), grouped(cache.k), grouped(cache.v)))
            keys, values = (t.reshape(spec.num_layers, *t.shape[2:]) for t in (keys, values))
        logits = self.vocab_projection()(self.final_norm(x[:, -1]))  # [B, V]
        return logits, KVCache(keys, values, kv_positions, kv_segments, index + input_ids.shape[1])

    def empty_cache(self, batch: int, max_length: int) -> KVCache:
        """A decode cache for `batch` rows of up to `max_length` tokens, in the compute dtype."""
        spec = self.spec
        shape = (spec.num_layers, batch, max_length, spec.num_kv_heads, spec.head_dim)
        zeros = jnp.zeros(shape, self.execution.dtype)
        ids = jnp.zeros((batch, max_length), jnp.int32)
        return KVCache(zeros, zeros, ids, ids, jnp.zeros((), jnp.int32))

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
