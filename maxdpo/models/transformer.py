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

    def _over_layers(self, fn: Callable, x: jax.Array, per_layer=None) -> tuple[jax.Array, object]:
        """x through every layer: `fn(h, layer_index, window, inputs) -> (h, outputs)`, `inputs` the layer's slice
        of `per_layer` (a pytree of [L, ...] arrays). With `scan_layers` the layers are scanned in groups of the
        windows' period (each layer's window static inside its group), the leftover layers after; otherwise a
        Python loop. Returns (x, the outputs stacked [L, ...])."""
        spec = self.spec
        windows = spec.layer_windows()

        def stacked(outputs):  # list over layers -> [layers, ...]
            return jax.tree.map(lambda *values: jnp.stack(values), *outputs)

        def in_turn(h, layers):
            outputs = []
            for index in layers:
                h, out = fn(h, index, windows[index], jax.tree.map(lambda t: t[index], per_layer))
                outputs.append(out)
            return h, outputs

        if not self.execution.scan_layers:
            x, outputs = in_turn(x, range(spec.num_layers))
            return x, stacked(outputs)
        period = layer_period(windows)
        groups = spec.num_layers // period

        def group(h, inputs):
            group_index, sliced = inputs  # sliced: [period, ...]
            outputs = []
            for offset in range(period):
                h, out = fn(h, group_index * period + offset, windows[offset],
                            jax.tree.map(lambda t: t[offset], sliced))
                outputs.append(out)
            return h, stacked(outputs)

        grouped = jax.tree.map(lambda t: t[:groups * period].reshape(groups, period, *t.shape[1:]), per_layer)
        x, outputs = jax.lax.scan(group, x, (jnp.arange(groups), grouped))
        outputs = jax.tree.map(lambda t: t.reshape(groups * period, *t.shape[2:]), outputs)
        x, tail = in_turn(x, range(groups * period, spec.num_layers))  # layers past the last whole group
        if tail:
            outputs = jax.tree.map(lambda whole, rest: jnp.concatenate([whole, rest]), outputs, stacked(tail))
        return x, outputs

    def _run_layers(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, shared_prefix: bool
                    ) -> tuple[jax.Array, Optional[jax.Array]]:
        """Runs every layer; returns (x, the MoE balance statistics summed over layers, or None)."""
        execution = self.execution
        graphdef, stacked = nnx.split(self.layers)

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

        layer_fns = {window: make_layer(window) for window in set(self.spec.layer_windows())}

        def apply(h, index, window, _):
            h, statistics = layer_fns[window](h, stacked, index)
            return h, () if statistics is None else statistics

        x, statistics = self._over_layers(apply, x)
        return x, (jnp.sum(statistics, axis=0) if self.spec.num_experts else None)  # [2, E]

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
        if statistics is not None:
            num_rows = jnp.sum(segment_ids > 0).astype(jnp.float32) * spec.num_layers
            aux_loss = load_balancing_loss(statistics, num_rows)
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
        cache with their keys and values written at `cache.length`)."""
        graphdef, stacked = nnx.split(self.layers)

        def layer(h, layer_index, window, k, v):  # -> (h, this layer's new keys and values [B, T, K, H])
            layer_state = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, layer_index, keepdims=False),
                                       stacked)
            return nnx.merge(graphdef, layer_state).decode(h, positions, segment_ids, window,
                                                           LayerCache(k, v, cache.positions, cache.segment_ids))

        x, (keys, values) = self._over_layers(lambda h, index, window, kv: layer(h, index, window, *kv),
                                              self._embed(input_ids), (cache.k, cache.v))  # [L, B, T, K, H] each
        logits = self.vocab_projection()(self.final_norm(x[:, -1]))  # [B, V]
        index = cache.length

        def write(buffer, new, axis):  # the new tokens' entries into the cache, in place in a loop's carry
            return jax.lax.dynamic_update_slice_in_dim(buffer, new, index, axis=axis)
        return logits, KVCache(write(cache.k, keys, 2), write(cache.v, values, 2),
                               write(cache.positions, positions, 1), write(cache.segment_ids, segment_ids, 1),
                               index + input_ids.shape[1])

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
