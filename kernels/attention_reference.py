"""Plain-JAX attention: the reference every attention kernel is tested against, and the `xla` path.

Masks are built from positions and segment ids so padding, packing and prefix sharing all use one
rule (`attention_blocks.visible`): a query sees a key when both sit in the same segment (or, with
shared prefixes, the key is in its pair's prompt) and the key's position is not later.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from maxdpo.kernels.attention_blocks import MaskRule, visible


def attention_mask(q_positions: jax.Array, kv_positions: jax.Array, q_segment_ids: jax.Array,
                   kv_segment_ids: jax.Array, rule: MaskRule) -> jax.Array:
    """Boolean mask [batch, q_len, kv_len]: True where the query may attend to the key."""
    return visible(rule, q_positions[:, :, None], q_segment_ids[:, :, None], kv_positions[:, None, :],
                   kv_segment_ids[:, None, :])


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
                        kv_positions: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                        scale: float, causal: bool = True, sliding_window: Optional[int] = None,
                        logit_softcap: Optional[float] = None, shared_prefix: bool = False) -> jax.Array:
    """Grouped-query attention with fp32 softmax.

    q: [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K. Returns [B, T, N, H] in q's dtype.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    q = q.reshape(batch, q_len, num_kv_heads, group, head_dim)  # [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        logits = jnp.tanh(logits / logit_softcap) * logit_softcap
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                          MaskRule(causal, sliding_window, shared_prefix))
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)  # [B, T, K, G, H]
    return out.reshape(batch, q_len, num_heads, head_dim)


