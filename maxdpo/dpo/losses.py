"""Preference losses as pure functions of per-sequence log-probs (TRL's formulas).

Each takes log-probs [B] of the policy and the reference on chosen and rejected completions and
returns the per-pair loss [B].
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def sigmoid_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
                 ref_rejected: jax.Array, *, beta: float, label_smoothing: float = 0.0, **_) -> jax.Array:
    """DPO (Rafailov et al. 2023), with cDPO label smoothing: -log σ(β·h)(1-ε) - log σ(-β·h)ε."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # [B]
    return (-jax.nn.log_sigmoid(beta * logits) * (1 - label_smoothing)
            - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "sigmoid": sigmoid_loss,
}


def preference_loss(name: str, policy_chosen, policy_rejected, ref_chosen, ref_rejected, **hyper) -> jax.Array:
    if name not in LOSSES:
        raise ValueError(f"unknown dpo.loss {name!r}; supported: {sorted(LOSSES)}")
    return LOSSES[name](policy_chosen.astype(jnp.float32), policy_rejected.astype(jnp.float32),
                        ref_chosen.astype(jnp.float32), ref_rejected.astype(jnp.float32), **hyper)
