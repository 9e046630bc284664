"""Per-sequence completion log-probs and the logit statistics TRL logs."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def completion_logps(logits: jax.Array, input_ids: jax.Array, completion_mask: jax.Array, segment_ids: jax.Array,
                     num_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per packed sequence, the sum over its completion tokens of log p(token | previous tokens).

    logits [R, T, V] fp32, input_ids/completion_mask/segment_ids [R, T] (segment k+1 = the row's k-th
    sequence). Returns, each [R, num_segments]: logps, the sum over completion tokens of the vocab-mean
    logit, and the completion token count.
    """
    targets = input_ids[:, 1:]  # [R, T-1]
    mask = completion_mask[:, 1:].astype(jnp.float32)  # [R, T-1]
    logits = logits[:, :-1]  # [R, T-1, V]
    log_norm = jax.nn.logsumexp(logits, axis=-1)  # [R, T-1]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [R, T-1]
    # A target token's segment: the first token of a sequence is never a completion token, so a
    # prediction across a boundary is always masked out.
    segments = segment_ids[:, 1:, None] == jnp.arange(1, num_segments + 1)  # [R, T-1, S]
    segments = segments.astype(jnp.float32)

    def per_segment(values):  # [R, T-1] -> [R, S]
        return jnp.einsum("rt,rts->rs", values * mask, segments)

    return per_segment(target_logits - log_norm), per_segment(jnp.mean(logits, axis=-1)), per_segment(
        jnp.ones_like(mask))
