"""KTO and APO-zero unpaired against TRL's KTOTrainer (1.16) itself, in-process on the same tiny transformers
policy and (different) reference: one step's loss, KL estimate, metrics and gradient norm; the per-micro-batch
aggregation of its logged metrics under gradient accumulation; and whole runs through `python -m maxdpo.train`
(tokenisation, mismatched completions, batching, optimizer) logging TRL's values at every step."""
import json

import numpy as np
import pytest
import torch
import trl
from datasets import Dataset
from transformers import AutoTokenizer

from hf_models import tiny_llama
from maxdpo import train
from maxdpo.data.batch import PAIRED, Batch
from maxdpo.data.sources import resolve_path
from maxdpo.dpo.losses import LossHyper
from maxdpo.dpo.step import LossSettings, finalize_metrics
from test_trl_parity import ROWS as PAIRS, first_step, step_with_settings
from tokenizer_kinds import make_tokenizer

# 12 distinct labelled single completions, desirable and undesirable mixed within every 4 and every 6
SIDES = ["chosen", "rejected", "rejected", "chosen", "chosen", "rejected"]
UNPAIRED = [{"prompt": row["prompt"], "completion": row[side], "label": side == "chosen"}
            for row, side in zip(PAIRS * 2, SIDES + [{"chosen": "rejected", "rejected": "chosen"}[s] for s in SIDES])]
METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
           "logits/chosen", "logits/rejected", "grad_norm")
# (loss_type, beta, desirable_weight, undesirable_weight)
CASES = [("kto", 0.1, 1.0, 1.0), ("kto", 0.5, 1.0, 1.33), ("kto", 2.0, 0.7, 1.0),
         ("apo_zero_unpaired", 0.3, 1.0, 1.0), ("apo_zero_unpaired", 0.5, 1.2, 0.8)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kto")  # seeds whose mismatched pairs give a positive KL estimate (else 0)
    return tiny_llama(tmp / "policy", seed=1), tiny_llama(tmp / "ref", seed=0), tmp


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer"))


def kto_trainer(policy_hf, ref_hf, tokenizer, tmp, rows, loss_type, beta, desirable, undesirable, per_device):
    args = trl.KTOConfig(output_dir=str(tmp / "trl"), loss_type=loss_type, beta=beta, desirable_weight=desirable,
                         undesirable_weight=undesirable, per_device_train_batch_size=per_device, report_to=[],
                         use_cpu=True, bf16=False, max_length=32)
    return trl.KTOTrainer(model=policy_hf, ref_model=ref_hf, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)


def maxdpo_batch(trl_batches: list[dict]) -> Batch:
    """TRL's KTO batches (sequences, their mismatched KL sequences, labels) as one maxdpo batch: [B, 2, T] with
    side 0 the example and side 1 its mismatched sequence (without one, apo_zero_unpaired: maxdpo's one-token
    stub), one example per row, `labels` [B, 1]."""
    length = max(b[key].shape[1] for b in trl_batches for key in ("input_ids", "KL_input_ids") if key in b)

    def sides(name):
        def padded(batch, kind):
            if f"{kind}{name}" not in batch:  # the stub: the sequence's first token, no completion
                values = batch[name][:, :1].numpy() * (name != "completion_mask")
            else:
                values = batch[f"{kind}{name}"].numpy()
            return np.pad(values.astype(np.int32), ((0, 0), (0, length - values.shape[1])))
        return np.concatenate([np.stack([padded(b, ""), padded(b, "KL_")], axis=1) for b in trl_batches])

    attention = sides("attention_mask")
    labels = np.concatenate([b["label"].numpy() for b in trl_batches]).astype(np.float32)[:, None]
    return Batch(input_ids=sides("input_ids"), positions=np.maximum(np.cumsum(attention, -1) - 1, 0),
                 segment_ids=attention, completion_mask=sides("completion_mask"),
                 pair_mask=np.ones_like(labels), layout=PAIRED, labels=labels)


def maxdpo_step(tmp, batch, loss, beta, desirable, undesirable, num_micro=1):
    settings = LossSettings(loss, LossHyper(beta, desirable_weight=desirable, undesirable_weight=undesirable))
    metrics, eval_sums = step_with_settings(tmp, batch, settings, num_micro)
    return metrics, finalize_metrics(eval_sums, settings)


@pytest.mark.parametrize("loss,beta,desirable,undesirable", CASES)
def test_kto_step_equals_trl(models, tokenizer, loss, beta, desirable, undesirable):
    policy_hf, ref_hf, tmp = models
    trainer = kto_trainer(policy_hf, ref_hf, tokenizer, tmp, UNPAIRED, loss, beta, desirable, undesirable,
                          per_device=len(UNPAIRED))
    batch, expected = first_step(trainer, trainer._metrics)
    assert batch["label"].any() and not batch["label"].all()
    if loss == "kto":
        assert expected["kl"] > 0  # the KL estimate really enters the loss
    metrics, evaluated = maxdpo_step(tmp, maxdpo_batch([batch]), loss, beta, desirable, undesirable)
    for name in METRICS:
        assert float(metrics[name]) == pytest.approx(expected[name], rel=2e-4, abs=1e-5), name
        if name != "grad_norm":  # evaluation: the same quantities
            assert float(evaluated[name]) == pytest.approx(expected[name], rel=2e-4, abs=1e-5), name


def test_kto_metrics_are_means_over_micro_batches_as_trl_logs_them(models, tokenizer):
    """Preference rows unpaired as TRL does (per 1000 rows every chosen, then every rejected completion) in two
    micro-batches of 6: the first holds only desirable examples, the second only undesirable ones. TRL logs the
    mean over micro-batches of each one's values, a metric only where it is defined (no rewards/margins); maxdpo
    with 2 micro-batches logs the same, NaN where TRL logs nothing."""
    policy_hf, ref_hf, tmp = models
    trainer = kto_trainer(policy_hf, ref_hf, tokenizer, tmp, PAIRS, "kto", 0.3, 1.0, 1.0, per_device=len(PAIRS))
    batches = list(trainer.get_train_dataloader())
    assert [b["label"].tolist() for b in batches] == [[True] * 6, [False] * 6]
    trainer.model.train()
    trainer.model.zero_grad()
    losses = [trainer.compute_loss(trainer.model, batch) / 2 for batch in batches]
    for loss in losses:
        loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in trainer.model.parameters() if p.grad is not None))
    expected = {name: float(np.mean(values)) for name, values in trainer._metrics["train"].items()}
    expected.update(loss=float(sum(losses)), grad_norm=float(grad_norm))
    assert "rewards/margins" not in expected
    metrics, _ = maxdpo_step(tmp, maxdpo_batch(batches), "kto", 0.3, 1.0, 1.0, num_micro=2)
    for name in METRICS:
        if name == "rewards/margins":
            assert np.isnan(float(metrics[name]))
        else:
            assert float(metrics[name]) == pytest.approx(expected[name], rel=2e-4, abs=1e-5), name


@pytest.mark.parametrize("loss_type,log_every", [("kto", 1), ("apo_zero_unpaired", 1), ("kto", 3)])
def test_kto_run_equals_trls(tmp_path, loss_type, log_every):
    """Three steps of 2 micro-batches of 4 labelled examples (lr 1e-2, constant): TRL's KTOTrainer.train() and
    `python -m maxdpo.train dpo.loss=...` on the same jsonl, model and tokenizer log the same loss, KL and
    reward metrics at every step, or, logging every 3 steps, over the window's six micro-batches."""
    model = tmp_path / "model"
    tiny_llama(model)
    tokenizer = make_tokenizer("adds_bos", tmp_path / "tokenizer")
    rows = (UNPAIRED * 2)[:24]
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), loss_type=loss_type, beta=0.3,
                         per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
                         logging_steps=log_every,
                         learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True, bf16=False,
                         save_strategy="no", max_length=64)
    trainer = trl.KTOTrainer(model=str(model), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(tokenizer))
    trainer.train()
    theirs = [row for row in trainer.state.log_history if "loss" in row]

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = tmp_path / "maxdpo"
    assert train.main([f"model.path={model}", f"tokenizer.path={tokenizer}", f"data.train={data}", "data.eval=null",
                       f"dpo.loss={loss_type}", "dpo.beta=0.3", "trainer.batch_size=8", "trainer.micro_batch_size=4",
                       "trainer.max_steps=3", f"trainer.log_every={log_every}", "data.shuffle=false",
                       "data.max_length=64",
                       "data.max_prompt_length=32", "optimizer.learning_rate=1e-2", "optimizer.schedule=constant",
                       "optimizer.warmup_ratio=0", "mesh.data=4", "mesh.tensor=2", f"run.output_dir={run}"]) == 0
    ours = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(theirs) == len(ours) == 3 // log_every
    names = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
             "logps/rejected", "logits/chosen"] + (["kl"] if loss_type == "kto" else [])
    for name in names:
        np.testing.assert_allclose([row[name] for row in ours], [row[name] for row in theirs], rtol=2e-3,
                                   atol=1e-4, err_msg=name)
