"""Per-sequence completion log-probs and the logit statistics TRL logs."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from maxdpo.kernels.attention_blocks import PREFIX_GROUP


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


def shared_completion_logps(logits: jax.Array, input_ids: jax.Array, completion_mask: jax.Array,
                            segment_ids: jax.Array, prefix_target: jax.Array, num_slots: int
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`completion_logps` for prefix-sharing rows (`maxdpo/data/prefix_sharing.py`).

    logits [R, T, V] fp32; the rest [R, T]. A completion token is predicted by its left neighbour, except
    each pair's first rejected token, predicted by the last prompt token (`prefix_target` there). Returns,
    each [R, K, 2] (chosen, rejected): logps, sums of vocab-mean logits, completion token counts.
    """
    log_norm = jax.nn.logsumexp(logits, axis=-1)  # [R, T]
    mean_logit = jnp.mean(logits, axis=-1)  # [R, T]

    def scatter(values, mask, segments, side):  # [R, T'] at (slot, side) bins -> [R, K, 2]
        slot = segments // PREFIX_GROUP - 1
        bins = jax.nn.one_hot(slot * 2 + side, 2 * num_slots, dtype=jnp.float32)  # [R, T', 2K]
        return jnp.einsum("rt,rtb->rb", values * mask, bins).reshape(values.shape[0], num_slots, 2)

    # tokens predicted by their left neighbour: chosen (branch 1) or rejected (branch 2) tokens
    targets = input_ids[:, 1:]  # [R, T-1]
    neighbour = jnp.take_along_axis(logits[:, :-1], targets[..., None], axis=-1)[..., 0] - log_norm[:, :-1]
    mask = completion_mask[:, 1:].astype(jnp.float32)
    segments = segment_ids[:, 1:]
    side = segments % PREFIX_GROUP - 1
    # first rejected tokens, predicted at the last prompt position
    first = prefix_target >= 0  # [R, T]
    from_prompt = (jnp.take_along_axis(logits, jnp.maximum(prefix_target, 0)[..., None], axis=-1)[..., 0]
                   - log_norm)
    first_mask = first.astype(jnp.float32)

    def both(neighbour_values, prompt_values):
        return (scatter(neighbour_values, mask, segments, side)
                + scatter(prompt_values, first_mask, segment_ids, jnp.ones_like(segment_ids)))

    return (both(neighbour, from_prompt), both(mean_logit[:, :-1], mean_logit),
            both(jnp.ones_like(mask), jnp.ones_like(first_mask)))
