"""Per-sequence completion log-probs and the logit statistics TRL logs.

`token_stats` projects hidden states onto the vocabulary a chunk of positions at a time, keeping only
what the loss needs per position (log p of a label, the vocab-mean logit), and recomputes each chunk in
the backward pass, so fp32 [rows, seq, vocab] logits never exist whole (Llama-3's 128k vocabulary at
16 x 2048 tokens would be 17 GB).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from maxdpo.kernels.attention_blocks import PREFIX_GROUP


def token_stats(project: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array,
                extra_labels: Optional[jax.Array] = None, chunk: int = 0,
                sum_sq: bool = False) -> dict[str, jax.Array]:
    """Per position of hidden [R, T, D]: `label_logps` log p(labels) [R, T], `extra_logps` log p(extra_labels)
    (when given; negative labels read as 0, mask them), `mean_logit` [R, T], and with `sum_sq` `log_sum_sq`,
    log sum_v p_v^2 (WPO's weights). chunk: positions per vocab projection (0: all at once)."""
    extra = labels if extra_labels is None else extra_labels

    def stats(x, label, second):  # [R, c, D], [R, c], [R, c]
        logits = project(x)  # [R, c, V] fp32
        log_norm = jax.nn.logsumexp(logits, axis=-1)

        def log_prob(ids):
            return jnp.take_along_axis(logits, jnp.maximum(ids, 0)[..., None], axis=-1)[..., 0] - log_norm
        values = (log_prob(label), log_prob(second), jnp.mean(logits, axis=-1))
        return values + (jax.nn.logsumexp(2 * logits, axis=-1) - 2 * log_norm,) if sum_sq else values

    rows, seq, _ = hidden.shape
    if not chunk or chunk >= seq:
        values = stats(hidden, labels, extra)
    else:
        padded = -(-seq // chunk) * chunk
        pad = [(0, 0), (0, padded - seq)]

        def by_chunk(x):  # [R, T, ...] -> [T / c, R, c, ...]
            x = jnp.pad(x, pad + [(0, 0)] * (x.ndim - 2))
            return jnp.moveaxis(x.reshape(rows, padded // chunk, chunk, *x.shape[2:]), 1, 0)

        chunks = jax.lax.map(lambda args: jax.checkpoint(stats)(*args), (by_chunk(hidden), by_chunk(labels),
                                                                         by_chunk(extra)))
        values = [jnp.moveaxis(c, 0, 1).reshape(rows, padded)[:, :seq] for c in chunks]
    out = {"label_logps": values[0], "mean_logit": values[2]}
    if sum_sq:
        out["log_sum_sq"] = values[3]
    if extra_labels is not None:
        out["extra_logps"] = values[1]
    return out


def next_token_labels(input_ids: jax.Array) -> jax.Array:
    """[R, T]: the token each position predicts (the last position's label is a dummy, always masked)."""
    return jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)


def completion_logps(stats: dict, completion_mask: jax.Array, segment_ids: jax.Array,
                     num_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per packed sequence, the sum over its completion tokens of log p(token | previous tokens).

    stats from `token_stats` with next-token labels; completion_mask/segment_ids [R, T] (segment k+1 = the
    row's k-th sequence). Returns, each [R, num_segments]: logps, the sum over completion tokens of the
    vocab-mean logit, and the completion token count.
    """
    mask = completion_mask[:, 1:].astype(jnp.float32)  # [R, T-1], by target token
    # A target token's segment: the first token of a sequence is never a completion token, so a
    # prediction across a boundary is always masked out.
    segments = (segment_ids[:, 1:, None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)  # [R, T-1, S]

    def per_segment(values):  # [R, T-1] -> [R, S]
        return jnp.einsum("rt,rts->rs", values * mask, segments)

    return (per_segment(stats["label_logps"][:, :-1]), per_segment(stats["mean_logit"][:, :-1]),
            per_segment(jnp.ones_like(mask)))


def length_desensitised_weights(completion_mask: jax.Array, segment_ids: jax.Array, num_segments: int,
                                 alpha: float) -> jax.Array:
    """LD-DPO (Liu et al. 2024) as TRL's `ld_alpha`: [2B, T] weights for pair rows (chosen, rejected of a pair
    adjacent): 1 on the first min(|y_w|, |y_l|) completion tokens of each sequence, alpha on the longer one's
    tail, 0 off the completions; `completion_logps` with them as the mask sums shared + alpha * tail."""
    mask = completion_mask.astype(jnp.float32)  # [2B, T]
    segments = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)  # [2B, T, S]
    position = jnp.cumsum(mask[..., None] * segments, axis=1)  # [2B, T, S]: completion tokens so far
    lengths = position[:, -1, :]  # [2B, S]
    shared = jnp.repeat(jnp.minimum(lengths[0::2], lengths[1::2]), 2, axis=0)  # [2B, S], per pair
    within = jnp.sum(segments * (position <= shared[:, None, :]), axis=-1)  # [2B, T]: 1 in the shared span
    return mask * (within + alpha * (1 - within))


def shared_completion_logps(stats: dict, completion_mask: jax.Array, segment_ids: jax.Array,
                            prefix_target: jax.Array, num_slots: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`completion_logps` for prefix-sharing rows (`maxdpo/data/prefix_sharing.py`).

    stats from `token_stats` with next-token labels and `prefix_target` as extra labels. A completion token
    is predicted by its left neighbour, except each pair's first rejected token, predicted by the last
    prompt token (`prefix_target` there). Returns, each [R, K, 2] (chosen, rejected): logps, sums of
    vocab-mean logits, completion token counts.
    """
    def scatter(values, mask, segments, side):  # [R, T'] at (slot, side) bins -> [R, K, 2]
        slot = segments // PREFIX_GROUP - 1
        bins = jax.nn.one_hot(slot * 2 + side, 2 * num_slots, dtype=jnp.float32)  # [R, T', 2K]
        return jnp.einsum("rt,rtb->rb", values * mask, bins).reshape(values.shape[0], num_slots, 2)

    mask = completion_mask[:, 1:].astype(jnp.float32)  # tokens predicted by their left neighbour
    segments = segment_ids[:, 1:]
    side = segments % PREFIX_GROUP - 1  # branch 1 (chosen) -> 0, branch 2 (rejected) -> 1
    first_mask = (prefix_target >= 0).astype(jnp.float32)  # first rejected tokens, at the last prompt position
    rejected = jnp.ones_like(segment_ids)

    def both(neighbour_values, prompt_values):
        return scatter(neighbour_values[:, :-1], mask, segments, side) + scatter(prompt_values, first_mask,
                                                                                segment_ids, rejected)

    ones = jnp.ones(segment_ids.shape, jnp.float32)
    return (both(stats["label_logps"], stats["extra_logps"]), both(stats["mean_logit"], stats["mean_logit"]),
            both(ones, ones))
