"""Per-sequence completion log-probs and the logit statistics TRL logs."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def completion_logps(logits: jax.Array, input_ids: jax.Array, completion_mask: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sum over completion tokens of log p(token | previous tokens).

    logits [R, T, V] fp32, input_ids/completion_mask [R, T]. Returns (logps [R], sum over completion
    tokens of the vocab-mean logit [R], completion token count [R]).
    """
    targets = input_ids[:, 1:]  # [R, T-1]
    mask = completion_mask[:, 1:].astype(jnp.float32)  # [R, T-1]
    logits = logits[:, :-1]  # [R, T-1, V]
    log_norm = jax.nn.logsumexp(logits, axis=-1)  # [R, T-1]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [R, T-1]
    logps = jnp.sum((target_logits - log_norm) * mask, axis=-1)
    mean_logit_sum = jnp.sum(jnp.mean(logits, axis=-1) * mask, axis=-1)
    return logps, mean_logit_sum, jnp.sum(mask, axis=-1)
