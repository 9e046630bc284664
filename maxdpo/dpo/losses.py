"""Preference losses as pure functions of per-pair log-probs: TRL's DPO family (with f-DPO's divergences), DPOP
(Pal et al. 2024), and the reference-free CPO and SimPO (TRL's CPOTrainer) and ORPO (its ORPOTrainer); and the
registry of every loss, the unpaired KTO and BCO too (their batch-level part is `maxdpo.dpo.unpaired`).

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
    pair_mask: jax.Array = 1.0  # [B] 1 for real pairs, 0 for padding slots (losses over the batch: aot)
    plain_chosen: Optional[jax.Array] = None  # [B] the chosen logps unweighted, where LD-DPO weighs policy_chosen
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



@dataclasses.dataclass(frozen=True)
class LossHyper:
    beta: float
    label_smoothing: float = 0.0
    dpop_lambda: float = 50.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    desirable_weight: float = 1.0  # unpaired losses (KTO, APO-zero unpaired): weight of desirable examples
    undesirable_weight: float = 1.0


log_sigmoid = jax.nn.log_sigmoid
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_scores(x: PairLogps, h: LossHyper) -> tuple[jax.Array, jax.Array]:
    """f'(u) of the chosen and rejected likelihood ratios u = πθ/π_ref, f-DPO's (Wang et al. 2023) generalisation
    of the log-ratios c and r: reverse KL log u (DPO), forward KL 1 − 1/u, Jensen-Shannon log(2u / (1 + u)),
    α-divergence (u^(α−1) − 1)/(α−1), its exponent clamped at 80 as TRL does (α = 1: log u); forward KL's
    exponent is clamped the same way (TRL overflows to inf there)."""
    kind, alpha = h.f_divergence_type, h.f_alpha_divergence_coef
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return x.chosen_logratios, x.rejected_logratios
    transforms = {"forward_kl": lambda v: 1 - jnp.exp(jnp.minimum(-v, 80.0)),  # capped as alpha's (TRL: inf)
                  "js_divergence": lambda v: jnp.log(2.0) + log_sigmoid(v),
                  "alpha_divergence": lambda v: (jnp.exp(jnp.minimum((alpha - 1) * v, 80.0)) - 1) / (alpha - 1)}
    return transforms[kind](x.chosen_logratios), transforms[kind](x.rejected_logratios)


def score_delta(x: PairLogps, h: LossHyper) -> jax.Array:
    """The chosen minus the rejected f-score: d under the reverse KL."""
    chosen, rejected = f_scores(x, h)
    return chosen - rejected


def per_token_score_delta(x: PairLogps, h: LossHyper) -> jax.Array:
    """The f-scores averaged over each completion's tokens: c/|y_w| − r/|y_l| under the reverse KL."""
    chosen, rejected = f_scores(x, h)
    return chosen / jnp.maximum(x.chosen_tokens, 1.0) - rejected / jnp.maximum(x.rejected_tokens, 1.0)


def smoothed_sigmoid(logits: jax.Array, eps: float) -> jax.Array:
    """cDPO's −(1−ε)·log σ(z) − ε·log σ(−z)."""
    return -(1 - eps) * log_sigmoid(logits) - eps * log_sigmoid(-logits)


def sigmoid_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """DPO (Rafailov et al. 2023) with cDPO label smoothing ε: −(1−ε)·log σ(βd) − ε·log σ(−βd)."""
    return smoothed_sigmoid(h.beta * score_delta(x, h), h.label_smoothing)


def hinge_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """SLiC: max(0, 1 − βd)."""
    return jax.nn.relu(1 - h.beta * score_delta(x, h))


def ipo_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """IPO (Azar et al. 2023, eq. 17) on per-token log-ratios, as TRL normalises it: (c/|y_w| − r/|y_l| − 1/(2β))²."""
    return (per_token_score_delta(x, h) - 1 / (2 * h.beta)) ** 2


def exo_pair_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """EXO (Ji et al. 2024, eq. 16): KL(softmax(β·[c, r]) ‖ [1−ε, ε]); needs ε > 0."""
    eps, logits = h.label_smoothing, h.beta * score_delta(x, h)
    return (jax.nn.sigmoid(logits) * (log_sigmoid(logits) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-logits) * (log_sigmoid(-logits) - jnp.log(eps)))


def nca_pair_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """NCA (Chen et al. 2024): −log σ(βc) − ½·log σ(−βc) − ½·log σ(−βr)."""
    chosen, rejected = h.beta * x.chosen_logratios, h.beta * x.rejected_logratios
    return -log_sigmoid(chosen) - 0.5 * log_sigmoid(-chosen) - 0.5 * log_sigmoid(-rejected)


def robust_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """rDPO (Chowdhury et al. 2024): unbiased under label-flip rate ε: [−(1−ε)·log σ(βd) + ε·log σ(−βd)] / (1−2ε)."""
    eps, logits = h.label_smoothing, h.beta * score_delta(x, h)
    return (-(1 - eps) * log_sigmoid(logits) + eps * log_sigmoid(-logits)) / (1 - 2 * eps)


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
    return -log_sigmoid(h.beta * per_token_score_delta(x, h))


def discopop_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """DiscoPOP (Chan Lu et al. 2024, eq. 5), log-ratio modulated: with z = βd and m = σ(z/τ),
    (1 − m)·(−log σ(z)) + m·exp(−z)."""
    logits = h.beta * score_delta(x, h)
    modulation = jax.nn.sigmoid(logits / h.discopop_tau)
    # m·exp(−z) as exp(log m − z): finite where m underflows to 0 and exp(−z) overflows (z < −88)
    return (1 - modulation) * -log_sigmoid(logits) + jnp.exp(log_sigmoid(logits / h.discopop_tau) - logits)


def _sorted_dominance(first: jax.Array, second: jax.Array, x: PairLogps, h: LossHyper) -> jax.Array:
    """cDPO's sigmoid on sorted(first) − sorted(second) over the real pairs (padding slots, wherever the packing
    left them, sorted last as the largest float so that the two sorts subtract to 0 there); the k-th smallest
    difference's loss is placed on the k-th real slot, 0 on the padding ones."""
    real = jnp.broadcast_to(jnp.asarray(x.pair_mask) > 0, first.shape)
    top = jnp.finfo(first.dtype).max
    delta = jnp.sort(jnp.where(real, first, top)) - jnp.sort(jnp.where(real, second, top))
    losses = smoothed_sigmoid(h.beta * delta, h.label_smoothing)  # [B], real ones first
    losses = jnp.where(jnp.arange(losses.shape[0]) < jnp.sum(real), losses, 0.0)
    return jnp.zeros_like(losses).at[jnp.argsort(~real, stable=True)].set(losses)


def aot_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """AOT (Melnyk et al. 2024), paired: distributional dominance by optimal transport in one dimension, i.e.
    cDPO's sigmoid on the sorted policy log-ratios (log πθ(y_w) − log πθ(y_l)) minus the sorted reference
    ones, over the (micro-)batch's real pairs. The losses are per sorted position, not per pair."""
    return _sorted_dominance(x.policy_chosen - x.policy_rejected, x.ref_chosen - x.ref_rejected, x, h)


def aot_unpaired_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """AOT, unpaired: the sorted chosen log-ratios c minus the sorted rejected ones r."""
    return _sorted_dominance(x.chosen_logratios, x.rejected_logratios, x, h)


def sft_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """NLL of the chosen completions (every token weighing 1, also under LD-DPO); its mean over the batch's pairs
    is the mean NLL per chosen token (TRL)."""
    return -(x.policy_chosen if x.plain_chosen is None else x.plain_chosen) * x.sft_scale


def dpop_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """DPO-Positive (Pal et al. 2024, arXiv 2402.13228, eq. 3): −log σ(β·(d − λ·max(0, −c))), penalising a
    chosen completion whose likelihood falls below the reference's."""
    return -log_sigmoid(h.beta * (x.delta - h.dpop_lambda * jax.nn.relu(-x.chosen_logratios)))


def cpo_loss(x: PairLogps, h: LossHyper) -> jax.Array:
    """CPO (Xu et al. 2024, eq. 3) without its NLL term (`dpo.sft_weight`, TRL's cpo_alpha): DPO's sigmoid with
    cDPO smoothing ε on the policy's own log-probs, −(1−ε)·log σ(β(c − r)) − ε·log σ(−β(c − r))."""
    return smoothed_sigmoid(h.beta * (x.policy_chosen - x.policy_rejected), h.label_smoothing)


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
    return smoothed_sigmoid(h.beta * (x.chosen_means - x.rejected_means) - h.simpo_gamma, h.label_smoothing)


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
    it trains on single completions (no rejected side: SFT data) instead of preference pairs, or on labelled
    single completions (an unpaired loss: its `anchor`, and `fn` the loss of a desirable example's z), whether its
    rewards (and logged logps) are per-token means of the policy's log-probs (SimPO, ORPO) rather than sums,
    whether it needs the chosen sequences' NLL with the prompt (ORPO), whether it takes f-DPO's scores, and the
    per-pair metrics it adds."""
    fn: Callable[[PairLogps, LossHyper], jax.Array]
    title: str
    reads: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    needs_reference: bool = True
    completions: bool = False
    mean_logps: bool = False
    sequence_nll: bool = False
    f_divergence: bool = False  # honours dpo.f_divergence_type (TRL's set of losses on f-scores)
    batch_level: bool = False  # the loss of a pair depends on the other pairs of its micro-batch (aot)
    anchor: str = ""  # unpaired losses (`maxdpo.dpo.unpaired`): kl | zero | running_mean; fn maps z to a loss
    metrics: Optional[Callable[[PairLogps, LossHyper], dict[str, jax.Array]]] = None
    hint: str = ""  # said with a missing required hyper-parameter

    @property
    def unpaired(self) -> bool:
        """Trains on single completions labelled desirable or not (TRL's KTOTrainer and BCOTrainer)."""
        return bool(self.anchor)


def sigmoid_complement(z: jax.Array, h: LossHyper) -> jax.Array:
    """KTO's and APO's value of an unpaired example: 1 − σ(z)."""
    return 1 - jax.nn.sigmoid(z)


def negative_log_sigmoid(z: jax.Array, h: LossHyper) -> jax.Array:
    """BCO's binary cross-entropy of an unpaired example: −log σ(z)."""
    return -log_sigmoid(z)


SMOOTHING = ("label_smoothing",)
UNPAIRED_WEIGHTS = ("desirable_weight", "undesirable_weight")
LOSSES: dict[str, Loss] = {
    "sigmoid": Loss(sigmoid_loss, "DPO (Direct Preference Optimization)", reads=SMOOTHING, f_divergence=True),
    "ipo": Loss(ipo_loss, "IPO", f_divergence=True),
    "hinge": Loss(hinge_loss, "SLiC (hinge)", f_divergence=True),
    "robust": Loss(robust_loss, "robust DPO", reads=SMOOTHING, f_divergence=True),
    "exo_pair": Loss(exo_pair_loss, "EXO", reads=SMOOTHING, requires=SMOOTHING, f_divergence=True,
                     hint="its target distribution is [1 - ε, ε]; TRL suggests 1e-3"),
    "nca_pair": Loss(nca_pair_loss, "NCA"),
    "bco_pair": Loss(bco_pair_loss, "BCO"),
    "sppo_hard": Loss(sppo_hard_loss, "SPPO"),
    "apo_zero": Loss(apo_zero_loss, "APO-zero"),
    "apo_down": Loss(apo_down_loss, "APO-down"),
    "sigmoid_norm": Loss(sigmoid_norm_loss, "length-normalised DPO", f_divergence=True),
    "discopop": Loss(discopop_loss, "DiscoPOP", reads=("discopop_tau",), f_divergence=True),
    "aot": Loss(aot_loss, "AOT (Alignment via Optimal Transport), paired", reads=SMOOTHING, batch_level=True),
    "aot_unpaired": Loss(aot_unpaired_loss, "AOT (Alignment via Optimal Transport), unpaired", reads=SMOOTHING,
                         batch_level=True),
    "sft": Loss(sft_loss, "supervised fine-tuning", needs_reference=False, completions=True),
    "dpop": Loss(dpop_loss, "DPOP (DPO-Positive)", reads=("dpop_lambda",)),
    "cpo": Loss(cpo_loss, "CPO (Contrastive Preference Optimization)", reads=SMOOTHING, needs_reference=False,
                metrics=nll_metric),
    "simpo": Loss(simpo_loss, "SimPO (Simple Preference Optimization)", reads=SMOOTHING + ("simpo_gamma",),
                  needs_reference=False, mean_logps=True, metrics=nll_metric),
    "orpo": Loss(orpo_loss, "ORPO (Odds Ratio Preference Optimization)", needs_reference=False, mean_logps=True,
                 sequence_nll=True, metrics=orpo_metrics),
    "kto": Loss(sigmoid_complement, "KTO (Kahneman-Tversky Optimization)", reads=UNPAIRED_WEIGHTS, anchor="kl"),
    "apo_zero_unpaired": Loss(sigmoid_complement, "APO-zero, unpaired", reads=UNPAIRED_WEIGHTS, anchor="zero"),
    "bco": Loss(negative_log_sigmoid, "BCO (Binary Classifier Optimization)", anchor="running_mean"),
}
LOSS_NAMES = tuple(LOSSES)
Terms = tuple[tuple[str, float], ...]  # a weighted list of losses: ((name, weight), ...)


def mixture(terms: Terms) -> Loss:
    """One record for TRL's weighted list of DPOTrainer losses (`loss_type` with `loss_weights`; MPO): the
    per-pair loss sum_k w_k loss_k, with every hyper-parameter a term reads or needs; f-DPO's divergence only
    when every term takes it (`sft` aside, as TRL)."""
    records = [LOSSES[name] for name, _ in terms]

    def weighted(x: PairLogps, h: LossHyper) -> jax.Array:
        return sum(weight * LOSSES[name].fn(x, h) for name, weight in terms)

    return Loss(weighted, " + ".join(f"{weight:g} x {record.title}" for (_, weight), record in zip(terms, records)),
                reads=tuple(dict.fromkeys(key for record in records for key in record.reads)),
                requires=tuple(dict.fromkeys(key for record in records for key in record.requires)),
                needs_reference=any(record.needs_reference for record in records),
                batch_level=any(record.batch_level for record in records),
                f_divergence=all(record.f_divergence or name == "sft" for (name, _), record in zip(terms, records)))


def loss_record(loss: str | Terms) -> Loss:
    """The record of a loss name or of a weighted list of losses."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"unknown dpo.loss {loss!r}; supported: {list(LOSS_NAMES)}")
        return LOSSES[loss]
    return mixture(loss)


def preference_loss(loss: str | Terms, x: PairLogps, hyper: LossHyper, sft_weight: float = 0.0) -> jax.Array:
    """Per-pair loss [B]: that of `loss` (a name or weighted terms), plus `sft_weight` × the SFT term (TRL's
    loss_type=[name, "sft"])."""
    record = loss_record(loss)
    x = PairLogps(*(None if value is None else jnp.asarray(value, jnp.float32) for value in x))
    losses = record.fn(x, hyper)
    if sft_weight:
        losses = losses + sft_weight * sft_loss(x, hyper)
    return losses
