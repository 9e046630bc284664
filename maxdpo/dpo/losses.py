"""Preference losses as pure functions of per-pair log-probs: TRL's DPO family, DPOP (Pal et al. 2024), and the
reference-free CPO and SimPO (TRL's CPOTrainer) and ORPO (its ORPOTrainer).

Every loss maps `PairLogps` (each field [B], fp32) to a per-pair loss [B]; the step takes their mean over
the batch's pairs. Notation: c = log πθ(y_w|x) − log π_ref(y_w|x), r = the same for y_l, d = c − r; without a
reference (its logps are 0) c and r are the policy's own log-probs.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


class PairLogps(NamedTuple):
    policy_chosen: jax.Array  # [B] summed completion log-probs
    policy_rejected: jax.Array
    ref_chosen: jax.Array
    ref_rejected: jax.Array
    chosen_tokens: jax.Array  # [B] completion token counts
    rejected_tokens: jax.Array
    sft_scale: jax.Array  # [] pairs / chosen completion tokens of the whole batch: turns a mean over pairs
    # of summed NLLs into TRL's mean over the batch's chosen tokens
    chosen_sequence_nll: jax.Array = 0.0  # [B] ORPO: the chosen sequence's NLL, prompt included, x pairs / the
    # whole batch's chosen sequence tokens (so its mean over pairs is the NLL per token, as TRL's ORPOTrainer)

    @property
    def chosen_logratios(self) -> jax.Array:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> jax.Array:
        return self.policy_rejected - self.ref_rejected

    @property
    def delta(self) -> jax.Array:
        return self.chosen_logratios - self.rejected_logratios

    @property
    def chosen_means(self) -> jax.Array:
        """log πθ(y_w|x) / |y_w|: the policy's mean log-prob per chosen token."""
        return self.policy_chosen / jnp.maximum(self.chosen_tokens, 1.0)

    @property
    def rejected_means(self) -> jax.Array:
        return self.policy_rejected / jnp.maximum(self.rejected_tokens, 1.0)

    @property
    def per_token_delta(self) -> jax.Array:
        """c/|y_w| − r/|y_l|: the log-ratios averaged over each completion's tokens."""
        return (self.chosen_logratios / jnp.maximum(self.chosen_tokens, 1.0)
                - self.rejected_logratios / jnp.maximum(self.rejected_tokens, 1.0))


@dataclasses.dataclass(frozen=True)
class LossHyper:
    beta: float
    label_smoothing: float = 0.0
    dpop_lambda: float = 50.0
    simpo_gamma: float = 0.5


log_sigmoid = jax.nn.log_sigmoid


def sigmoid_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """DPO (Rafailov et al. 2023) with cDPO label smoothing ε: −(1−ε)·log σ(βd) − ε·log σ(−βd)."""
    return -(1 - h.label_smoothing) * log_sigmoid(h.beta * x.delta) - h.label_smoothing * log_sigmoid(-h.beta * x.delta)


def hinge_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """SLiC: max(0, 1 − βd)."""
    return jax.nn.relu(1 - h.beta * x.delta)


def ipo_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """IPO (Azar et al. 2023, eq. 17) on per-token log-ratios, as TRL normalises it: (c/|y_w| − r/|y_l| − 1/(2β))²."""
    return (x.per_token_delta - 1 / (2 * h.beta)) ** 2


def exo_pair_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """EXO (Ji et al. 2024, eq. 16): KL(softmax(β·[c, r]) ‖ [1−ε, ε]); needs ε > 0."""
    eps = h.label_smoothing
    return (jax.nn.sigmoid(h.beta * x.delta) * (log_sigmoid(h.beta * x.delta) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-h.beta * x.delta) * (log_sigmoid(-h.beta * x.delta) - jnp.log(eps)))


def nca_pair_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """NCA (Chen et al. 2024): −log σ(βc) − ½·log σ(−βc) − ½·log σ(−βr)."""
    chosen, rejected = h.beta * x.chosen_logratios, h.beta * x.rejected_logratios
    return -log_sigmoid(chosen) - 0.5 * log_sigmoid(-chosen) - 0.5 * log_sigmoid(-rejected)


def robust_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """rDPO (Chowdhury et al. 2024): unbiased under label-flip rate ε: [−(1−ε)·log σ(βd) + ε·log σ(−βd)] / (1−2ε)."""
    eps = h.label_smoothing
    return (-(1 - eps) * log_sigmoid(h.beta * x.delta) + eps * log_sigmoid(-h.beta * x.delta)) / (1 - 2 * eps)


def bco_pair_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """BCO on pairs: −log σ(βc) − log σ(−βr)."""
    return -log_sigmoid(h.beta * x.chosen_logratios) - log_sigmoid(-h.beta * x.rejected_logratios)


def sppo_hard_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """SPPO (Wu et al. 2024) with hard win probabilities: (c − 1/(2β))² + (r + 1/(2β))²."""
    return (x.chosen_logratios - 0.5 / h.beta) ** 2 + (x.rejected_logratios + 0.5 / h.beta) ** 2


def apo_zero_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): 1 − σ(βc) + σ(βr)."""
    return 1 - jax.nn.sigmoid(h.beta * x.chosen_logratios) + jax.nn.sigmoid(h.beta * x.rejected_logratios)


def apo_down_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """APO-down (eq. 8): σ(βc) + 1 − σ(βd)."""
    return jax.nn.sigmoid(h.beta * x.chosen_logratios) + 1 - jax.nn.sigmoid(h.beta * x.delta)


def sigmoid_norm_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """DPO on per-token log-ratios: −log σ(β·(c/|y_w| − r/|y_l|))."""
    return -log_sigmoid(h.beta * x.per_token_delta)


def sft_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """NLL of the chosen completions; its mean over the batch's pairs is the mean NLL per chosen token (TRL)."""
    return -x.policy_chosen * x.sft_scale


def dpop_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """DPO-Positive (Pal et al. 2024, arXiv 2402.13228, eq. 3): −log σ(β·(d − λ·max(0, −c))), penalising a
    chosen completion whose likelihood falls below the reference's."""
    return -log_sigmoid(h.beta * (x.delta - h.dpop_lambda * jax.nn.relu(-x.chosen_logratios)))


def cpo_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """CPO (Xu et al. 2024, eq. 3) without its NLL term (`dpo.sft_weight`, TRL's cpo_alpha): DPO's sigmoid with
    cDPO smoothing ε on the policy's own log-probs, −(1−ε)·log σ(β(c − r)) − ε·log σ(−β(c − r))."""
    logits = h.beta * (x.policy_chosen - x.policy_rejected)
    return -(1 - h.label_smoothing) * log_sigmoid(logits) - h.label_smoothing * log_sigmoid(-logits)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 − exp(x)) for x < 0, by the branch that keeps its precision on each side of −log 2."""
    return jnp.where(x < -jnp.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_log_odds(x: PairLogps) -> jax.Array:
    """log odds(y_w|x) − log odds(y_l|x), odds(y|x) = P(y|x) / (1 − P(y|x)) with P the mean probability per
    token, exp(log πθ(y|x)/|y|) (Hong et al. 2024, eq. 4-5). An empty pair slot (padding; no tokens, mean 0,
    odds infinite) gets a finite stand-in so that neither it nor its gradient is NaN before the pair mask."""
    chosen, rejected = (jnp.where(tokens > 0, means, -1.0) for tokens, means in (
        (x.chosen_tokens, x.chosen_means), (x.rejected_tokens, x.rejected_means)))
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def orpo_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """ORPO (Hong et al. 2024, eq. 6-7), no reference: NLL of the chosen sequence − λ·log σ(log odds ratio), with
    λ = β and the NLL over the whole chosen sequence, prompt included, as TRL's ORPOTrainer computes it."""
    return x.chosen_sequence_nll - h.beta * log_sigmoid(orpo_log_odds(x))


def simpo_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """SimPO (Meng et al. 2024, eq. 6): −log σ(β/|y_w|·log πθ(y_w|x) − β/|y_l|·log πθ(y_l|x) − γ), with cDPO
    smoothing ε as TRL's CPOTrainer applies it."""
    logits = h.beta * (x.chosen_means - x.rejected_means) - h.simpo_gamma
    return -(1 - h.label_smoothing) * log_sigmoid(logits) - h.label_smoothing * log_sigmoid(-logits)


def nll_metric(x: PairLogps, h: LossHyper) -> dict[str, jax.Array]:
    """CPO / SimPO log the mean NLL per chosen completion token (TRL's CPOTrainer `nll_loss`)."""
    return {"nll_loss": sft_loss(x, h)}


def orpo_metrics(x: PairLogps, h: LossHyper) -> dict[str, jax.Array]:
    """TRL's ORPOTrainer: the chosen sequences' NLL, log σ(log odds ratio) and the log odds ratio."""
    log_odds = orpo_log_odds(x)
    return {"nll_loss": x.chosen_sequence_nll, "log_odds_ratio": log_sigmoid(log_odds), "log_odds_chosen": log_odds}


@dataclasses.dataclass(frozen=True)
class Loss:
    """What maxdpo knows about one loss: its function, its title (model card), the `dpo.*` hyper-parameters
    it reads besides beta, those it cannot do without (> 0), whether it needs a reference model, whether
    it trains on single completions (no rejected side: SFT data) instead of preference pairs, whether its
    rewards (and logged logps) are per-token means of the policy's log-probs (SimPO, ORPO) rather than sums,
    whether it needs the chosen sequences' NLL with the prompt (ORPO), and the per-pair metrics it adds."""
    fn: Callable[[PairLogps, LossHyper], jax.Array]
    title: str
    reads: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    needs_reference: bool = True
    completions: bool = False
    mean_logps: bool = False
    sequence_nll: bool = False
    metrics: Optional[Callable[[PairLogps, LossHyper], dict[str, jax.Array]]] = None
    hint: str = ""  # said with a missing required hyper-parameter


SMOOTHING = ("label_smoothing",)
LOSSES: dict[str, Loss] = {
    "sigmoid": Loss(sigmoid_loss, "DPO (Direct Preference Optimization)", reads=SMOOTHING),
    "ipo": Loss(ipo_loss, "IPO"),
    "hinge": Loss(hinge_loss, "SLiC (hinge)"),
    "robust": Loss(robust_loss, "robust DPO", reads=SMOOTHING),
    "exo_pair": Loss(exo_pair_loss, "EXO", reads=SMOOTHING, requires=SMOOTHING,
                     hint="its target distribution is [1 - ε, ε]; TRL suggests 1e-3"),
    "nca_pair": Loss(nca_pair_loss, "NCA"),
    "bco_pair": Loss(bco_pair_loss, "BCO"),
    "sppo_hard": Loss(sppo_hard_loss, "SPPO"),
    "apo_zero": Loss(apo_zero_loss, "APO-zero"),
    "apo_down": Loss(apo_down_loss, "APO-down"),
    "sigmoid_norm": Loss(sigmoid_norm_loss, "length-normalised DPO"),
    "sft": Loss(sft_loss, "supervised fine-tuning", needs_reference=False, completions=True),
    "dpop": Loss(dpop_loss, "DPOP (DPO-Positive)", reads=("dpop_lambda",)),
    "cpo": Loss(cpo_loss, "CPO (Contrastive Preference Optimization)", reads=SMOOTHING, needs_reference=False,
                metrics=nll_metric),
    "simpo": Loss(simpo_loss, "SimPO (Simple Preference Optimization)", reads=SMOOTHING + ("simpo_gamma",),
                  needs_reference=False, mean_logps=True, metrics=nll_metric),
    "orpo": Loss(orpo_loss, "ORPO (Odds Ratio Preference Optimization)", needs_reference=False, mean_logps=True,
                 sequence_nll=True, metrics=orpo_metrics),
}
LOSS_NAMES = tuple(LOSSES)


def preference_loss(name: str, x: PairLogps, hyper: LossHyper, sft_weight: float = 0.0) -> jax.Array:
    """Per-pair loss [B]: `name`'s, plus `sft_weight` × the SFT term (TRL's loss_type=[name, "sft"])."""
    if name not in LOSSES:
        raise ValueError(f"unknown dpo.loss {name!r}; supported: {list(LOSS_NAMES)}")
    x = PairLogps(*(jnp.asarray(value, jnp.float32) for value in x))
    losses = LOSSES[name].fn(x, hyper)
    if sft_weight:
        losses = losses + sft_weight * sft_loss(x, hyper)
    return losses
