"""The shared decoder: embeddings, a stack of pre-norm blocks (scanned over a `layers` axis), final norm, LM head.

Families differ only by their ModelSpec and the small pieces their modules pass in.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from maxdpo.models.layers import Attention, GatedMLP, RMSNorm, make_param
from maxdpo.models.spec import ModelSpec

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """x + attn(norm(x)), then + mlp(norm(x)). Built with a leading `layers` axis on every parameter."""

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs, num_layers: int):
        self.attn_norm = RMSNorm(spec, num_layers)
        self.attn = Attention(spec, rngs, num_layers)
        self.mlp_norm = RMSNorm(spec, num_layers)
        self.mlp = GatedMLP(spec, rngs, num_layers)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), positions, segment_ids)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__` maps token ids [batch, seq] to fp32 logits [batch, seq, vocab]."""

    def __init__(self, spec: ModelSpec, rngs: nnx.Rngs):
        self.spec = spec
        self.embed = make_param(rngs, (spec.vocab_size, spec.hidden_size), ("vocab", "embed"),
                                spec.param_dtype, spec.initializer_range)
        self.layers = Block(spec, rngs, spec.num_layers)
        self.final_norm = RMSNorm(spec)
        if not spec.tie_word_embeddings:
            self.lm_head = make_param(rngs, (spec.hidden_size, spec.vocab_size), ("embed", "vocab"),
                                      spec.param_dtype, spec.initializer_range)

    def _run_layers(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        graphdef, stacked = nnx.split(self.layers)

        def layer(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, positions, segment_ids), None

        if self.spec.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.spec.remat], prevent_cse=not self.spec.scan_layers)
        if self.spec.scan_layers:
            return jax.lax.scan(layer, x, stacked)[0]
        for index in range(self.spec.num_layers):
            x = layer(x, jax.tree.map(lambda p: p[index], stacked))[0]
        return x

    def __call__(self, input_ids: jax.Array, positions: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """input_ids [B, T]; positions [B, T] (default 0..T-1); segment_ids [B, T] (0 = padding) or an
        attention_mask [B, T] of 1/0 as in transformers. Returns logits [B, T, V] in float32."""
        spec = self.spec
        batch, seq = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        if segment_ids is None:
            segment_ids = (jnp.ones((batch, seq), jnp.int32) if attention_mask is None
                           else attention_mask.astype(jnp.int32))
        embed = self.embed[...]
        x = jnp.take(embed, input_ids, axis=0).astype(spec.dtype)  # [B, T, D]
        x = self._run_layers(x, positions, segment_ids)
        x = self.final_norm(x)
        head = embed.T if spec.tie_word_embeddings else self.lm_head[...]  # [D, V]
        return jnp.einsum("BTD,DV->BTV", x, head.astype(spec.dtype), preferred_element_type=jnp.float32)


def logical_axes_of(state: nnx.State) -> dict:
    """Nested dict of each parameter's `logical_axes` metadata."""
    def axes(variable):
        return variable.get_metadata().get("logical_axes")
    return nnx.to_pure_dict(jax.tree.map(axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def abstract_model(spec: ModelSpec) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params as ShapeDtypeStructs, each parameter's logical axes), allocating nothing."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(spec, nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state), logical_axes_of(state)
