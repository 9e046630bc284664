"""Loss, metrics and gradient norm of maxdpo's train step against TRL's DPOTrainer itself, run in-process
(torch CPU) on the same tiny transformers models (a policy and a *different* reference) and the same batch."""
import jax
import numpy as np
import optax
import pytest
import torch
import trl
from datasets import Dataset
from flax import nnx
from transformers import AutoTokenizer

from hf_models import maxdpo_params, tiny_hf, tiny_llama
from maxdpo.config import FreezeConfig
from maxdpo.data.batch import PAIRED, Batch
from maxdpo.data.sources import resolve_path
from maxdpo.dpo.freeze import trainable_split
from maxdpo.dpo.losses import LossHyper
from maxdpo.dpo.step import SFT_METRICS, LossSettings, make_eval_step, make_train_step
from maxdpo.models.registry import get_family


ROWS = [
    {"prompt": "add 1 + 2 =", "chosen": " 3", "rejected": " 4"},
    {"prompt": "copy a b c :", "chosen": " a b c", "rejected": " a b"},
    {"prompt": "parity of 7 ?", "chosen": " odd", "rejected": " even"},
    {"prompt": "next after a ?", "chosen": " b", "rejected": " z y x w"},
    {"prompt": "reverse x y :", "chosen": " y x", "rejected": " x y x"},
    {"prompt": "add 2 + 2 =", "chosen": " 4", "rejected": " 5 6"},
]
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected")

# (dpo.loss, beta, label_smoothing, sft_weight): every TRL loss maxdpo offers, several betas, smoothing where
# TRL reads it, and DPO + SFT (TRL: loss_type=["sigmoid", "sft"], loss_weights=[1, w]). TRL >= 1.0 ignores
# label_smoothing for "sigmoid"; maxdpo keeps cDPO there (TRL 0.x), checked in test_losses.py.
CASES = [
    ("sigmoid", 0.3, 0.0, 0.0),
    ("sigmoid", 0.1, 0.0, 0.0),
    ("ipo", 0.5, 0.0, 0.0),
    ("hinge", 2.0, 0.0, 0.0),
    ("robust", 0.3, 0.2, 0.0),
    ("exo_pair", 0.3, 1e-3, 0.0),
    ("nca_pair", 0.3, 0.0, 0.0),
    ("bco_pair", 0.3, 0.0, 0.0),
    ("sppo_hard", 0.3, 0.0, 0.0),
    ("apo_zero", 0.3, 0.0, 0.0),
    ("apo_down", 0.3, 0.0, 0.0),
    ("sigmoid_norm", 0.3, 0.0, 0.0),
    ("sft", 0.3, 0.0, 0.0),
    ("sigmoid", 0.3, 0.0, 0.7),
]
# (dpo.loss, beta, label_smoothing, sft_weight, options): TRL's DPOConfig options maxdpo names alike under dpo.*
OPTION_CASES = [
    ("discopop", 0.3, 0.0, 0.0, {"discopop_tau": 0.05}),
    ("discopop", 0.3, 0.0, 0.0, {"discopop_tau": 0.7}),
    ("aot", 0.3, 0.0, 0.0, {}),
    ("aot", 0.5, 0.2, 0.0, {}),
    ("aot_unpaired", 0.3, 0.1, 0.0, {}),
    ("sigmoid", 0.3, 0.0, 0.0, {"f_divergence_type": "forward_kl"}),
    ("sigmoid", 0.3, 0.0, 0.0, {"f_divergence_type": "js_divergence"}),
    ("sigmoid", 0.3, 0.0, 0.0, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    ("ipo", 0.5, 0.0, 0.0, {"f_divergence_type": "js_divergence"}),
    ("hinge", 2.0, 0.0, 0.0, {"f_divergence_type": "alpha_divergence"}),
    ("sigmoid_norm", 0.3, 0.0, 0.0, {"f_divergence_type": "forward_kl"}),
    ("discopop", 0.3, 0.0, 0.0, {"f_divergence_type": "js_divergence"}),
    # weighted lists (TRL's loss_type + loss_weights): MPO's, and two f-DPO terms
    ((("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)), 0.3, 0.0, 0.0, {}),
    ((("sigmoid", 1.0), ("hinge", 0.3)), 0.3, 0.0, 0.0, {"f_divergence_type": "js_divergence"}),
    # LD-DPO: the longer completion's tail weighted by ld_alpha, in the policy's and the reference's logps
    ("sigmoid", 0.3, 0.0, 0.0, {"ld_alpha": 0.5}),
    ("ipo", 0.5, 0.0, 0.3, {"ld_alpha": 0.0}),
    # WPO: each pair's loss weighted by its completions' detached probabilities (TRL 1.16 fails on the in-place
    # weighting of its expanded SFT term, so no sft_weight here)
    ("sigmoid", 0.3, 0.0, 0.0, {"use_weighting": True}),
    ("ipo", 0.5, 0.0, 0.0, {"use_weighting": True, "ld_alpha": 0.5}),
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer"))


def trl_step(policy_hf, ref_hf, tokenizer, tmp, loss, beta, smoothing, sft_weight, aux_coef=None, **options):
    """TRL's first training batch, its compute_loss (backward for the gradient norm) and logged metrics."""
    if isinstance(loss, tuple):  # weighted terms
        loss_type, weights = [name for name, _ in loss], [weight for _, weight in loss]
    else:
        loss_type, weights = ([loss, "sft"], [1.0, sft_weight]) if sft_weight else ([loss], None)
    args = trl.DPOConfig(output_dir=str(tmp / "trl"), loss_type=loss_type, loss_weights=weights, beta=beta,
                         label_smoothing=smoothing, per_device_train_batch_size=len(ROWS), report_to=[],
                         use_cpu=True, bf16=False, max_length=32,
                         router_aux_loss_coef=aux_coef, **options)  # bf16 autocast off: compare in fp32
    trainer = trl.DPOTrainer(model=policy_hf, ref_model=ref_hf, args=args, train_dataset=Dataset.from_list(ROWS),
                             processing_class=tokenizer)
    batch, metrics = first_step(trainer, trainer._metrics)
    return {name: value.numpy() for name, value in batch.items()}, metrics


def first_step(trainer, logged: dict) -> tuple[dict, dict]:
    """(the trainer's first training batch, its logged metrics (`logged["train"]`: lists of values) with the loss
    of its compute_loss and the gradient norm of its backward)."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.model.zero_grad()
    value = trainer.compute_loss(trainer.model, batch)
    value.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in trainer.model.parameters() if p.grad is not None))
    metrics = {name: values[-1] for name, values in logged["train"].items()}
    metrics.update(loss=value.item(), grad_norm=grad_norm.item())
    return batch, metrics


def maxdpo_batch(trl_batch):
    """TRL's [chosen rows; rejected rows] padded batch in maxdpo's layout: [B, 2, T], one pair per row."""
    def pairs(values):
        chosen, rejected = np.split(values.astype(np.int32), 2)
        return np.stack([chosen, rejected], axis=1)  # [B, 2, T]
    attention = pairs(trl_batch["attention_mask"])
    return Batch(input_ids=pairs(trl_batch["input_ids"]), positions=np.maximum(np.cumsum(attention, -1) - 1, 0),
                 segment_ids=attention, completion_mask=pairs(trl_batch["completion_mask"]),
                 pair_mask=np.ones((attention.shape[0], 1), np.float32), layout=PAIRED)


def maxdpo_step(tmp, batch, loss, beta, smoothing, sft_weight, aux_coef=0.0, num_micro=1, **options):
    # settings of the log-probs, not of the loss
    ld_alpha, use_weighting = options.pop("ld_alpha", None), options.pop("use_weighting", False)
    settings = LossSettings(loss, LossHyper(beta, smoothing, **options), sft_weight, aux_coef, ld_alpha,
                            use_weighting)
    return step_with_settings(tmp, batch, settings, num_micro)


def step_with_settings(tmp, batch, settings: LossSettings, num_micro: int = 1):
    """(metrics of one SGD train step, eval metric sums) of `tmp`'s policy against its reference on `batch`."""
    graphdef, params = maxdpo_params(tmp / "policy")
    _, ref_params = maxdpo_params(tmp / "ref")
    spec = nnx.merge(graphdef, params).spec
    split = trainable_split(spec, get_family(spec.family), FreezeConfig())
    tx = optax.sgd(1e-3)
    step = jax.jit(make_train_step(graphdef, settings, tx, optax.constant_schedule(1e-3), num_micro, split))
    state = {"step": np.int32(0), "params": params, "opt_state": tx.init(split.trainable(params))}
    _, metrics = step(state, ref_params, batch)
    eval_sums = jax.jit(make_eval_step(graphdef, settings))(params, ref_params, batch)
    return metrics, eval_sums


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama")
    return tiny_llama(tmp / "policy", seed=0), tiny_llama(tmp / "ref", seed=1), tmp


@pytest.mark.parametrize("loss,beta,smoothing,sft_weight,options", [case + ({},) for case in CASES] + OPTION_CASES)
def test_train_metrics_equal_trl(llama_pair, tokenizer, loss, beta, smoothing, sft_weight, options):
    policy_hf, ref_hf, tmp = llama_pair
    trl_batch, expected = trl_step(policy_hf, ref_hf, tokenizer, tmp, loss, beta, smoothing, sft_weight, **options)
    assert 0 < expected["rewards/accuracies"] < 1  # the reference really differs from the policy
    batch = maxdpo_batch(trl_batch)
    metrics, eval_sums = maxdpo_step(tmp, batch, loss, beta, smoothing, sft_weight, **options)
    # maxdpo's sft has no reference: it logs only what does not involve one (loss, chosen logps and logits)
    names = [name for name in METRICS if loss != "sft" or name in SFT_METRICS]
    for name in names + ["grad_norm"]:
        assert float(metrics[name]) == pytest.approx(expected[name], rel=2e-4, abs=1e-5), name
    # evaluation: sums over pairs of the same quantities
    pairs = float(eval_sums["pairs"])
    assert pairs == len(ROWS)
    for name in set(METRICS[:7]) & set(names):
        assert float(eval_sums[name]) / pairs == pytest.approx(expected[name], rel=2e-4, abs=1e-5), name


def test_gradient_accumulation_keeps_trl_values_for_token_normalised_losses(llama_pair, tokenizer):
    """sft (mean over the batch's tokens) and ipo (per-token ratios) over 3 micro batches of 2 pairs."""
    policy_hf, ref_hf, tmp = llama_pair
    for loss, sft_weight in (("ipo", 0.5), ("sft", 0.0)):
        trl_batch, expected = trl_step(policy_hf, ref_hf, tokenizer, tmp, loss, 0.5, 0.0, sft_weight)
        metrics, _ = maxdpo_step(tmp, maxdpo_batch(trl_batch), loss, 0.5, 0.0, sft_weight, num_micro=3)
        for name in ("loss", "grad_norm") + (("rewards/margins",) if loss != "sft" else ()):
            assert float(metrics[name]) == pytest.approx(expected[name], rel=2e-4, abs=1e-5), (loss, name)


def test_mixtral_router_aux_loss_as_trl(tmp_path, tokenizer):
    policy_hf = tiny_hf(tmp_path / "policy", "mixtral", seed=0)
    ref_hf = tiny_hf(tmp_path / "ref", "mixtral", seed=1)
    trl_batch, expected = trl_step(policy_hf, ref_hf, tokenizer, tmp_path, "sigmoid", 0.3, 0.0, 0.0, aux_coef=0.4)
    metrics, _ = maxdpo_step(tmp_path, maxdpo_batch(trl_batch), "sigmoid", 0.3, 0.0, 0.0, aux_coef=0.4)
    for name in METRICS + ("grad_norm", "aux_loss"):
        assert float(metrics[name]) == pytest.approx(expected[name], rel=2e-4, abs=1e-5), name


def reference_free_trainer_step(policy_hf, tokenizer, tmp, loss_type, beta, smoothing, cpo_alpha, gamma):
    """TRL's CPOTrainer (CPO, SimPO) or ORPOTrainer (`loss_type` "orpo") on its first batch: loss, gradient norm,
    logged metrics, and the batch as [chosen rows; rejected rows] padded to one length (DPOTrainer's layout,
    for `maxdpo_batch`)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    common = dict(beta=beta, per_device_train_batch_size=len(ROWS), report_to=[], use_cpu=True, bf16=False,
                  max_length=32)
    if loss_type == "orpo":
        trainer = ORPOTrainer(model=policy_hf, args=ORPOConfig(output_dir=str(tmp / "orpo"), **common),
                              train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    else:
        args = CPOConfig(output_dir=str(tmp / "cpo"), loss_type=loss_type, label_smoothing=smoothing,
                         cpo_alpha=cpo_alpha, simpo_gamma=gamma, **common)
        trainer = CPOTrainer(model=policy_hf, args=args, train_dataset=Dataset.from_list(ROWS),
                             processing_class=tokenizer)
    batch, metrics = first_step(trainer, trainer._stored_metrics)
    length = max(batch[f"{side}_input_ids"].shape[1] for side in ("chosen", "rejected"))

    def rows(name, pad):
        return torch.cat([torch.nn.functional.pad(batch[f"{side}_{name}"], (0, length - batch[f"{side}_{name}"].shape[1]),
                                                  value=pad) for side in ("chosen", "rejected")]).numpy()
    labels = rows("labels", -100)
    return {"input_ids": rows("input_ids", 0), "attention_mask": rows("attention_mask", 0),
            "completion_mask": (labels != -100).astype(np.int32)}, metrics


# (maxdpo loss, TRL CPOTrainer loss_type or "orpo", beta, label_smoothing, cpo_alpha = maxdpo's sft_weight,
# simpo_gamma)
REFERENCE_FREE_CASES = [
    ("cpo", "sigmoid", 0.1, 0.0, 1.0, 0.5),
    ("cpo", "sigmoid", 0.5, 0.2, 0.0, 0.5),
    ("simpo", "simpo", 2.0, 0.0, 0.0, 0.5),
    ("simpo", "simpo", 2.5, 0.1, 0.3, 1.2),
    ("orpo", "orpo", 0.1, 0.0, 0.0, 0.0),
    ("orpo", "orpo", 1.5, 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("loss,loss_type,beta,smoothing,cpo_alpha,gamma", REFERENCE_FREE_CASES)
def test_reference_free_metrics_equal_trl_cpo_trainer(llama_pair, tokenizer, loss, loss_type, beta, smoothing,
                                                      cpo_alpha, gamma):
    """CPO and SimPO against TRL's CPOTrainer, ORPO against its ORPOTrainer: loss, rewards/*, logps/* (per-token
    means for SimPO and ORPO), nll_loss, ORPO's log odds and the gradient norm, with no reference model. TRL's
    two trainers log logits/* as the mean over every position of the padded batch, prompt and padding included
    (maxdpo: over completion tokens, as DPOTrainer), and CPOTrainer logs nll_loss 0 when cpo_alpha is 0; those
    are not compared."""
    policy_hf, _, tmp = llama_pair
    trl_batch, expected = reference_free_trainer_step(policy_hf, tokenizer, tmp, loss_type, beta, smoothing,
                                                      cpo_alpha, gamma)
    assert 0 < expected["rewards/accuracies"] < 1
    graphdef, params = maxdpo_params(tmp / "policy")
    spec = nnx.merge(graphdef, params).spec
    settings = LossSettings(loss, LossHyper(beta, smoothing, simpo_gamma=gamma), cpo_alpha)
    split = trainable_split(spec, get_family(spec.family), FreezeConfig())
    tx = optax.sgd(1e-3)
    step = jax.jit(make_train_step(graphdef, settings, tx, optax.constant_schedule(1e-3), 1, split))
    state = {"step": np.int32(0), "params": params, "opt_state": tx.init(split.trainable(params))}
    _, metrics = step(state, None, maxdpo_batch(trl_batch))
    names = METRICS[:7] + (("nll_loss",) if cpo_alpha or loss == "orpo" else ()) + ("grad_norm",)
    names += ("log_odds_ratio", "log_odds_chosen") if loss == "orpo" else ()
    for name in names:
        assert float(metrics[name]) == pytest.approx(expected[name], rel=2e-4, abs=1e-5), name
