"""Unpaired preference losses on labelled single completions: KTO (Ethayarajh et al. 2024) and APO-zero's
unpaired form as TRL's KTOTrainer computes them, and BCO (Jung et al. 2024) as TRL's BCOTrainer
(`trl.experimental.bco`, last shipped in TRL 1.13).

An example is one completion y of a prompt x, desirable (label 1) or not, in its pair slot's chosen place;
the rejected place holds x with a mismatched completion y' (another example's: KTO) or a one-token stub.
The reward is β·(log πθ(y|x) − log π_ref(y|x)) and z = reward − anchor, the anchor being
  kl            β·z0, KTO's reference point: z0 = the micro-batch's mean of log πθ(y'|x) − log π_ref(y'|x),
                clamped at 0, without gradient
  zero          0 (APO-zero, unpaired)
  running_mean  δ, BCO's mean of every reward of the run so far, this micro-batch's included, without gradient
A desirable example's loss is f(z), an undesirable one's f(−z) (the loss record's `fn`), times
dpo.desirable_weight or dpo.undesirable_weight; the step takes the mean over the batch's examples.

Metrics keep TRL's names and aggregation: KTOTrainer averages per-micro-batch means over the micro-batches
that have them (rewards/chosen: the mean over micro-batches holding desirable examples of their mean
reward), BCOTrainer pools sums (rewards/chosen: all desirable rewards over their count); `kl` (KTO) and
`delta` (BCO) are means over micro-batches (`kl` is 0 for APO-zero unpaired, as TRL logs it). A metric no
micro-batch defines (no undesirable example) is NaN, which the log leaves out as TRL does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from maxdpo.dpo.losses import LossHyper, Loss

SIDES = ("chosen", "rejected")  # desirable, undesirable: TRL's metric names


def initial_moments() -> dict[str, jax.Array]:
    """BCO's running reward statistics before the first step: no rewards seen (an int32 count stays exact)."""
    return {"mean": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.int32)}


def update_moments(moments: dict[str, jax.Array], rewards: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """The mean of every reward so far after this micro-batch's `rewards` [N] (where `mask` [N] is 1), as TRL's
    RunningMoments.update moves its mean."""
    seen = jnp.sum(mask)
    batch_mean = jnp.sum(rewards * mask) / jnp.maximum(seen, 1.0)
    count = moments["count"] + seen.astype(jnp.int32)
    mean = moments["mean"] + (batch_mean - moments["mean"]) * seen / jnp.maximum(count, 1).astype(jnp.float32)
    return {"mean": mean, "count": count}


def _kl_estimate(policy: dict, reference: dict, mask: jax.Array) -> jax.Array:
    """KTO's z0: the mean over the micro-batch's examples of their mismatched pair's log-ratio, at least 0."""
    gap = policy["logps"][:, 1] - reference["logps"][:, 1]  # [N]
    return jax.lax.stop_gradient(jnp.maximum(jnp.sum(gap * mask) / jnp.maximum(jnp.sum(mask), 1.0), 0.0))


def metric_sums(record: Loss, hyper: LossHyper, policy: dict, reference: dict, pair_mask: jax.Array,
                labels: jax.Array, moments: dict | None, update: bool,
                aux: tuple[float, jax.Array] | None = None) -> tuple[jax.Array, dict, dict | None]:
    """(summed loss, metric sums, moments after this micro-batch) of one micro-batch's examples. policy /
    reference: per-slot stats ([N, 2] logps, logit sums and token counts; column 0 the example, 1 its
    mismatched pair); pair_mask, labels [rows, slots]; `update`: BCO's running mean takes this micro-batch's
    rewards (training) or stays (evaluation); aux: (coefficient, MoE router loss) added to every example."""
    mask = pair_mask.reshape(-1)  # [N]
    desirable = labels.reshape(-1) * mask
    undesirable = (1 - labels.reshape(-1)) * mask
    logps = policy["logps"][:, 0]
    rewards = hyper.beta * (logps - reference["logps"][:, 0])  # [N]
    detached = jax.lax.stop_gradient(rewards)
    anchor = jnp.zeros((), jnp.float32)
    logged = {"kl": anchor}  # TRL's KTOTrainer logs a KL of 0 for APO-zero unpaired
    if record.anchor == "kl":
        kl = _kl_estimate(policy, reference, mask)
        anchor, logged = hyper.beta * kl, {"kl": kl}
    elif record.anchor == "running_mean":
        moments = update_moments(moments, detached, mask) if update else moments
        anchor = moments["mean"]
        logged = {"delta": anchor}
    z = rewards - anchor
    losses = (hyper.desirable_weight * desirable * record.fn(z, hyper)
              + hyper.undesirable_weight * undesirable * record.fn(-z, hyper))  # [N]
    if aux is not None:
        losses = losses + aux[0] * aux[1] * mask
    present = (jnp.sum(mask) > 0).astype(jnp.float32)
    sums = {"loss": jnp.sum(losses), "pairs": jnp.sum(mask), "micro_batches": present,
            **{name: value * present for name, value in logged.items()}}
    if aux is not None:
        sums["aux_loss"] = aux[1] * jnp.sum(mask)
    means = {}
    for side, side_mask in zip(SIDES, (desirable, undesirable)):
        count = jnp.sum(side_mask)
        tokens = jnp.sum(side_mask * policy["counts"][:, 0])
        sums.update({f"count/{side}": count, f"present/{side}": (count > 0).astype(jnp.float32),
                     f"tokens/{side}": tokens, f"logit_sums/{side}": jnp.sum(side_mask * policy["logit_sums"][:, 0]),
                     f"present_tokens/{side}": (tokens > 0).astype(jnp.float32)})
        sums[f"logits/{side}/micro"] = sums[f"logit_sums/{side}"] / jnp.maximum(tokens, 1.0)
        for metric, values in (("rewards", detached), ("logps", jax.lax.stop_gradient(logps))):
            sums[f"{metric}/{side}"] = jnp.sum(values * side_mask)
            means[f"{metric}/{side}"] = sums[f"{metric}/{side}"] / jnp.maximum(count, 1.0)
            sums[f"{metric}/{side}/micro"] = means[f"{metric}/{side}"]
    both = sums["present/chosen"] * sums["present/rejected"]
    sums["rewards/margins/micro"] = both * (means["rewards/chosen"] - means["rewards/rejected"])
    sums["present/both"] = both
    return sums["loss"], sums, moments


def _ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, NaN (undefined: left out of the log) where the denominator is 0."""
    return jnp.where(denominator > 0, numerator / jnp.maximum(denominator, 1e-30), jnp.nan)


def finalize(sums: dict, record: Loss) -> dict:
    """The logged metrics from sums over micro-batches (module docstring): pooled for BCO, means of
    micro-batch means for KTO and APO-zero unpaired."""
    metrics = {"loss": sums["loss"] / sums["pairs"]}
    for name in ("kl", "delta"):
        if name in sums:
            metrics[name] = sums[name] / jnp.maximum(sums["micro_batches"], 1.0)
    if "aux_loss" in sums:
        metrics["aux_loss"] = sums["aux_loss"] / sums["pairs"]
    pooled = record.anchor == "running_mean"
    for side in SIDES:
        for metric in ("rewards", "logps"):
            metrics[f"{metric}/{side}"] = (_ratio(sums[f"{metric}/{side}"], sums[f"count/{side}"]) if pooled else
                                           _ratio(sums[f"{metric}/{side}/micro"], sums[f"present/{side}"]))
        metrics[f"logits/{side}"] = (_ratio(sums[f"logit_sums/{side}"], sums[f"tokens/{side}"]) if pooled else
                                     _ratio(sums[f"logits/{side}/micro"], sums[f"present_tokens/{side}"]))
    metrics["rewards/margins"] = (metrics["rewards/chosen"] - metrics["rewards/rejected"] if pooled else
                                  _ratio(sums["rewards/margins/micro"], sums["present/both"]))
    return metrics
