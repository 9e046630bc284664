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




def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array, *,
                     q_positions: jax.Array, q_segment_ids: jax.Array, cache_positions: jax.Array,
                     cache_segment_ids: jax.Array, scale: float, sliding_window: Optional[int] = None,
                     logit_softcap: Optional[float] = None) -> jax.Array:
    """Decoding: T new queries over the S cached keys and the T new ones, one fp32 softmax over both, without
    writing the new keys into the cache (the caller does, once for every layer). q: [B, T, N, H]; k, v:
    [B, T, K, H]; cache_k, cache_v: [B, S, K, H] (segment id 0: an empty slot). Returns [B, T, N, H]."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, T, K, G, H]
    rule = MaskRule(True, sliding_window)

    def logits(keys, kv_positions, kv_segment_ids):  # -> [B, K, G, T, S or T]
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, keys.astype(q.dtype), preferred_element_type=jnp.float32) * scale
        if logit_softcap is not None:
            scores = jnp.tanh(scores / logit_softcap) * logit_softcap
        mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, rule)
        return jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)

    cached = cache_k.shape[1]
    probs = jax.nn.softmax(jnp.concatenate([logits(cache_k, cache_positions, cache_segment_ids),
                                            logits(k, q_positions, q_segment_ids)], axis=-1), axis=-1)
    probs = probs.astype(v.dtype)
    out = (jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., :cached], cache_v.astype(v.dtype))
           + jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., cached:], v))  # [B, T, K, G, H]
    return out.reshape(batch, q_len, num_heads, head_dim)
