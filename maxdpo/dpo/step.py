"""The DPO train and eval steps: pure functions of (state, reference params, batch), jitted by `maxdpo.program`.

Chosen and rejected rows go through one forward ([B, 2, T] -> [2B, T], or [B, 1, T] prefix-shared rows);
the reference's logps come from its own forward or, precomputed, from the batch (reference params
None). Only the trainable part of the parameters (`TrainableSplit`) is differentiated and updated. Metrics are accumulated as sums
over pairs and completion tokens and divided once, so gradient accumulation over micro-batches gives
exactly the full-batch loss, gradients and metrics. Names and definitions follow TRL.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from maxdpo.data.batch import Batch
from maxdpo.dpo.logps import (completion_logps, length_desensitised_weights, next_token_labels,
                              shared_completion_logps, token_stats)
from maxdpo.dpo import low_precision, unpaired
from maxdpo.dpo.freeze import TrainableSplit
from maxdpo.dpo.losses import LossHyper, PairLogps, Terms, loss_record, preference_loss
from maxdpo.kernels.attention_blocks import PREFIX_GROUP
from maxdpo.models.lora import adapters_off

# Sums over pairs; divided by the number of pairs. Reference-free losses add `nll_loss` (TRL's CPOTrainer), ORPO
# its log odds (TRL's ORPOTrainer).
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")
SFT_METRICS = ("loss", "logps/chosen", "logits/chosen", "aux_loss")
WINDOW_SUM = "sum:"  # prefixes an unpaired step's metric sums, which logging adds up over its window


@dataclasses.dataclass(frozen=True)
class LossSettings:
    loss: str | Terms  # a loss name, or weighted terms (TRL's loss_type list with loss_weights)
    hyper: LossHyper
    sft_weight: float = 0.0  # adds sft_weight x the NLL of the chosen completions (TRL: loss_type=[loss, "sft"])
    router_aux_coef: float = 0.0  # MoE models: adds coef * router load-balancing loss to each pair's loss
    ld_alpha: Optional[float] = None  # LD-DPO: completion logps = shared span + ld_alpha x the longer one's tail
    use_weighting: bool = False  # WPO: each pair's loss weighted by its completions' (detached) probabilities

    @property
    def uses_reference(self) -> bool:
        """False for reference-free losses (SFT, CPO, SimPO, ORPO): no reference weights, forward pass or precomputed
        logps."""
        return loss_record(self.loss).needs_reference

    @property
    def sequence_nll(self) -> bool:
        """The loss needs the chosen sequences' NLL with their prompts (ORPO)."""
        return loss_record(self.loss).sequence_nll

    @property
    def detached_rejected(self) -> bool:
        """The rejected place's log-probs take no gradient (KTO's mismatched sequences feed only its KL estimate)."""
        return loss_record(self.loss).anchor == "kl"

    @property
    def sft(self) -> bool:
        """Trains on single completions (no rejected side, no rewards to log)."""
        return loss_record(self.loss).completions


def sequence_stats(graphdef: nnx.GraphDef, params: dict, batch: Batch, sequence_nll: bool = False,
                   ld_alpha: Optional[float] = None, use_weighting: bool = False) -> dict[str, jax.Array]:
    """Forward pass over chosen and rejected rows ([B, 2, T]; one side alone: [B, 1, T]) or prefix-shared rows
    ([B, 1, T]): per-pair logps and logit sums, each [B*K, sides] for B rows of K pair slots; MoE models add the router
    load-balancing loss of the whole forward (`aux_loss`, a scalar, as transformers computes it);
    `sequence_nll` adds `sequence_logps`, over every predicted token of each sequence, prompt included, and
    `ld_alpha` weighs the logps as LD-DPO (`length_desensitised_weights`), and `use_weighting` adds WPO's
    per-pair weight (`wpo_weight`); these three need the two-row layout."""
    rows, slots = batch.rows, batch.slots
    input_ids, segment_ids, completion_mask = (batch.flat(name) for name in
                                               ("input_ids", "segment_ids", "completion_mask"))  # [B*sides, T]
    model = nnx.merge(graphdef, params)
    hidden, aux_loss = model.hidden_states(input_ids, positions=batch.flat("positions"), segment_ids=segment_ids,
                                           shared_prefix=batch.shared)  # [B*sides, T, D], []
    labels = next_token_labels(input_ids)
    extra = batch.prefix_target[:, 0] if batch.shared else None
    tokens = token_stats(model.vocab_projection(), hidden, labels, extra, chunk=model.execution.logits_chunk,
                         sum_sq=use_weighting)
    if batch.shared:
        sums = shared_completion_logps(tokens, completion_mask, segment_ids, extra, slots)
        stats = {name: values.reshape(rows * slots, 2)  # [B, K, 2] -> [B*K, 2]
                 for name, values in zip(("logps", "logit_sums", "counts"), sums)}
    else:
        sums = completion_logps(tokens, completion_mask, segment_ids, slots)

        sides = batch.input_ids.shape[1]  # 2, or 1 for one side alone (`Batch.side`)

        def per_pair(values):  # [B*sides, K] -> [B*K, sides]
            return values.reshape(rows, sides, slots).transpose(0, 2, 1).reshape(rows * slots, sides)

        stats = dict(zip(("logps", "logit_sums", "counts"), map(per_pair, sums)))
        if ld_alpha is not None:
            weights = length_desensitised_weights(completion_mask, segment_ids, slots, ld_alpha)
            stats["plain_logps"] = stats["logps"]
            stats["logps"] = per_pair(completion_logps(tokens, weights, segment_ids, slots)[0])
        if use_weighting:  # WPO (Zhou et al. 2024, eq. 2): exp of each completion's mean of log p - log sum_v p_v^2
            aligned = {**tokens, "label_logps": tokens["label_logps"] - tokens["log_sum_sq"]}
            aligned_sums, _, counts = completion_logps(aligned, completion_mask, segment_ids, slots)
            means = per_pair(aligned_sums / jnp.maximum(counts, 1.0))  # [B*K, 2]
            stats["wpo_weight"] = jax.lax.stop_gradient(jnp.exp(means[:, 0] + means[:, 1]))
        if sequence_nll:
            whole = completion_logps(tokens, predicted_tokens(segment_ids), segment_ids, slots)[0]
            stats["sequence_logps"] = per_pair(whole)
    if model.spec.num_experts:
        stats["aux_loss"] = aux_loss
    return stats


def with_rejected(chosen: dict, rejected: dict) -> dict:
    """Per-pair stats ([B*K, 2]) from those of the chosen and of the rejected sequences alone ([B*K, 1] each); a
    router loss is the chosen forward's."""
    joined = {name: jnp.concatenate([chosen[name], rejected[name]], axis=1) for name in ("logps", "logit_sums",
                                                                                         "counts")}
    return {**joined, **({"aux_loss": chosen["aux_loss"]} if "aux_loss" in chosen else {})}


def reference_stats(graphdef: nnx.GraphDef, ref_params: Optional[dict], batch: Batch,
                    settings: LossSettings) -> dict:
    """The reference's per-pair logps [B*K, 2]: precomputed ones carried by the batch, or a forward pass
    (zeros for reference-free losses)."""
    if not settings.uses_reference:
        return {"logps": jnp.zeros(batch.pair_mask.shape + (2,), jnp.float32).reshape(-1, 2)}
    if batch.ref_logps is not None:
        return {"logps": batch.ref_logps.reshape(-1, 2)}  # [B, K, 2] -> [B*K, 2]
    return jax.lax.stop_gradient(sequence_stats(graphdef, ref_params, batch, ld_alpha=settings.ld_alpha))


def predicted_tokens(segment_ids: jax.Array) -> jax.Array:
    """[R, T] 1 where a token follows one of its own sequence: every token but each sequence's first."""
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return jnp.pad(same, ((0, 0), (1, 0))).astype(jnp.int32)


def token_scales(batch: Batch, settings: LossSettings) -> dict[str, jax.Array]:
    """Pairs per chosen completion token over the whole batch (see PairLogps.sft_scale), and for ORPO pairs per
    predicted token of the chosen sequences (PairLogps.chosen_sequence_nll)."""
    if batch.shared:  # chosen tokens are branch 1
        chosen = batch.completion_mask * (batch.segment_ids % PREFIX_GROUP == 1)
    else:
        chosen = batch.completion_mask[:, 0]
    pairs = jnp.sum(batch.pair_mask)
    scales = {"sft": pairs / jnp.maximum(jnp.sum(chosen), 1)}
    if settings.sequence_nll:
        scales["sequence"] = pairs / jnp.maximum(jnp.sum(predicted_tokens(batch.segment_ids[:, 0])), 1)
    return scales


def pair_metric_sums(policy: dict, reference: dict, settings: LossSettings, pair_mask: jax.Array,
                     scales: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    """(summed loss, metric sums) over the pairs with pair_mask 1; rewards = beta * (policy - reference logps),
    or beta * the policy's mean logps per token for losses on means (SimPO), which also log those as logps/*."""
    sequence_nll = -policy["sequence_logps"][:, 0] * scales["sequence"] if "sequence_logps" in policy else 0.0
    pair_mask = pair_mask.reshape(-1)  # [B, K] -> [B*K]
    logps = PairLogps(policy["logps"][:, 0], policy["logps"][:, 1], reference["logps"][:, 0],
                      reference["logps"][:, 1], policy["counts"][:, 0], policy["counts"][:, 1], scales["sft"],
                      pair_mask=pair_mask, chosen_sequence_nll=sequence_nll,
                      plain_chosen=policy["plain_logps"][:, 0] if "plain_logps" in policy else None)
    losses = preference_loss(settings.loss, logps, settings.hyper, settings.sft_weight)  # [B]
    if "wpo_weight" in policy:
        losses = losses * policy["wpo_weight"]
    if "aux_loss" in policy:
        losses = losses + settings.router_aux_coef * policy["aux_loss"]
    loss = loss_record(settings.loss)
    extra = loss.metrics(logps, settings.hyper) if loss.metrics else {}
    if loss.mean_logps:
        logps = logps._replace(policy_chosen=logps.chosen_means, policy_rejected=logps.rejected_means)
    chosen_rewards = settings.hyper.beta * logps.chosen_logratios
    rejected_rewards = settings.hyper.beta * logps.rejected_logratios
    per_pair = {
        "loss": losses,
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": logps.policy_chosen,
        "logps/rejected": logps.policy_rejected,
        "logit_sums/chosen": policy["logit_sums"][:, 0],
        "logit_sums/rejected": policy["logit_sums"][:, 1],
        "tokens/chosen": policy["counts"][:, 0],
        "tokens/rejected": policy["counts"][:, 1],
        "pairs": jnp.ones_like(losses),
    }
    if "aux_loss" in policy:
        per_pair["aux_loss"] = jnp.broadcast_to(policy["aux_loss"], losses.shape)
    per_pair.update({name: jnp.broadcast_to(value, losses.shape) for name, value in extra.items()})
    sums = {name: jnp.sum(value * pair_mask) for name, value in per_pair.items()}
    return sums["loss"], sums


def metric_sums(policy: dict, reference: dict, settings: LossSettings, batch: Batch, scales: dict[str, jax.Array],
                moments: Optional[dict], update: bool) -> tuple[jax.Array, dict, Optional[dict]]:
    """(summed loss, metric sums, BCO's reward moments after this batch) of paired or unpaired examples."""
    record = loss_record(settings.loss)
    if not record.unpaired:
        return (*pair_metric_sums(policy, reference, settings, batch.pair_mask, scales), moments)
    aux = (settings.router_aux_coef, policy["aux_loss"]) if "aux_loss" in policy else None
    return unpaired.metric_sums(record, settings.hyper, policy, reference, batch.pair_mask, batch.labels, moments,
                                update, aux)


def finalize_metrics(sums: dict, settings: LossSettings) -> dict:
    """Means over pairs; `logits/*` are means over all completion tokens of the batch, as TRL pools them.
    SFT keeps what it defines: loss (mean NLL per completion token), logps/chosen and logits/chosen; unpaired
    losses aggregate as their TRL trainers (`unpaired.finalize`)."""
    record = loss_record(settings.loss)
    if record.unpaired:
        return unpaired.finalize(sums, record)
    metrics = {name: sums[name] / sums["pairs"] for name in PAIR_METRICS + ("aux_loss",) if name in sums}
    for side in ("chosen", "rejected"):
        metrics[f"logits/{side}"] = sums[f"logit_sums/{side}"] / jnp.maximum(sums[f"tokens/{side}"], 1.0)
    if settings.sft:
        metrics = {name: value for name, value in metrics.items() if name in SFT_METRICS}
    return metrics


def split_micro_batches(batch: Batch, num_micro: int) -> Batch:
    """[B, ...] -> [num_micro, B / num_micro, ...] (contiguous blocks of rows)."""
    return jax.tree.map(lambda x: x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]), batch)


@dataclasses.dataclass(frozen=True)
class ReferenceSync:
    """TR-DPO (Gorbatovski et al. 2024), TRL's `sync_ref_model`: after every `steps`-th update the reference
    becomes alpha x policy + (1 - alpha) x reference (computed in fp32, kept in the reference's dtypes)."""
    steps: int
    alpha: float

    def __call__(self, step: jax.Array, reference: dict, params: dict) -> dict:
        """The reference after update number `step`."""
        def mix(tree):
            return jax.tree.map(lambda r, p: (self.alpha * p.astype(jnp.float32)
                                              + (1 - self.alpha) * r.astype(jnp.float32)).astype(r.dtype),
                                tree, params)
        return jax.lax.cond(step % self.steps == 0, mix, lambda tree: tree, reference)


def make_train_step(graphdef: nnx.GraphDef, settings: LossSettings, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, num_micro: int, split: TrainableSplit,
                    base_reference: bool = False, sync: Optional[ReferenceSync] = None) -> Callable:
    """train_step(state, ref_params, batch) -> (state, metrics); state = {step, params, opt_state}, and BCO's
    running reward mean `reward_moments` (`unpaired.initial_moments`), moved by every micro-batch.

    The optimizer sees only `split.trainable(params)`; `ref_params` is None when the batch carries
    precomputed reference logps, or with `base_reference` (LoRA): the reference is then the policy's own
    weights with the adapters off, no second copy. With `sync` (TR-DPO) the reference is part of the state
    (`state["reference"]`, moved by `sync` after the update) and `ref_params` is None.
    """

    def micro_step(trainable, frozen, ref_params, micro, scales, moments):
        if base_reference:
            ref_params = adapters_off(split.merge(trainable, frozen))
        reference = reference_stats(graphdef, ref_params, micro, settings)
        # KTO's mismatched sequences: a forward pass of their own outside the differentiated one (two-row layout)
        detached = settings.detached_rejected and not micro.shared
        rejected = (jax.lax.stop_gradient(sequence_stats(graphdef, split.merge(trainable, frozen), micro.side(1)))
                    if detached else None)

        def loss_fn(p):
            if detached:
                policy = with_rejected(sequence_stats(graphdef, split.merge(p, frozen), micro.side(0)), rejected)
            else:
                policy = sequence_stats(graphdef, split.merge(p, frozen), micro, settings.sequence_nll,
                                        settings.ld_alpha, settings.use_weighting)
            loss, sums, new_moments = metric_sums(policy, reference, settings, micro, scales, moments, update=True)
            return loss, (sums, new_moments)

        (_, (sums, moments)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return grads, sums, moments

    def train_step(state: dict[str, Any], ref_params: Optional[dict], batch: Batch) -> tuple[dict, dict]:
        trainable, frozen = split.trainable(state["params"]), split.frozen(state["params"])
        if sync:
            ref_params = state["reference"]
        scales = token_scales(batch, settings)

        def accumulate(carry, micro):
            grad_sums, sums, moments = carry
            grads, micro_sums, moments = micro_step(trainable, frozen, ref_params, micro, scales, moments)
            return (*jax.tree.map(jnp.add, (grad_sums, sums), (grads, micro_sums)), moments), None

        micro_batches = split_micro_batches(batch, num_micro)
        moments = state.get("reward_moments")
        zero = jax.eval_shape(micro_step, trainable, frozen, ref_params,
                              jax.tree.map(lambda x: x[0], micro_batches), scales, moments)[:2]
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
        (grad_sums, sums, moments), _ = jax.lax.scan(accumulate, (*zero, moments), micro_batches)
        # the gradient of the mean loss over pairs
        grads = split.zero_frozen_slices(jax.tree.map(lambda g: g / sums["pairs"], grad_sums))
        updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
        trainable = low_precision.apply_updates(trainable, split.zero_frozen_slices(updates), state["step"])
        metrics = finalize_metrics(sums, settings)
        if loss_record(settings.loss).unpaired:  # the log aggregates a window of steps from their sums
            metrics.update({WINDOW_SUM + name: value for name, value in sums.items()})
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(state["step"])
        new_state = {"step": state["step"] + 1, "params": split.merge(trainable, frozen), "opt_state": opt_state}
        if sync:
            new_state["reference"] = sync(new_state["step"], state["reference"], new_state["params"])
        if moments is not None:
            new_state["reward_moments"] = moments
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, settings: LossSettings, base_reference: bool = False) -> Callable:
    """eval_step(params, ref_params, batch, reward_moments) -> metric sums (summed over pairs, for averaging over
    batches); `base_reference` as in `make_train_step`; a moving reference (TR-DPO) is passed as `ref_params`;
    `reward_moments` is BCO's running reward mean (read, not moved), else None."""

    def eval_step(params: dict, ref_params: Optional[dict], batch: Batch,
                  reward_moments: Optional[dict] = None) -> dict:
        if loss_record(settings.loss).anchor == "running_mean" and reward_moments is None:
            raise ValueError("BCO's evaluation reads the run's running reward mean: pass state['reward_moments']")
        if base_reference:
            ref_params = adapters_off(params)
        reference = reference_stats(graphdef, ref_params, batch, settings)
        policy = sequence_stats(graphdef, params, batch, settings.sequence_nll, settings.ld_alpha,
                                settings.use_weighting)
        return metric_sums(policy, reference, settings, batch, token_scales(batch, settings), reward_moments,
                           update=False)[1]

    return eval_step


def make_reference_logps(graphdef: nnx.GraphDef) -> Callable:
    """reference_logps(ref_params, batch) -> [B*K, 2] summed completion logps (the precompute pass)."""

    def reference_logps(ref_params: dict, batch: Batch) -> jax.Array:
        return sequence_stats(graphdef, ref_params, batch)["logps"]

    return reference_logps
