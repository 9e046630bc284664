"""Whole runs, not single steps: the same HF model folder, tokenizer folder and jsonl trained by TRL's DPOTrainer
(1.16, in-process, torch CPU) and by `python -m maxdpo.train` log the same metrics at step 1, for tokenizers
that add a BOS, define one without adding it, or have none (tokenisation, batching, reference and loss all
in the comparison)."""
import json

import numpy as np
import pytest
import trl
from datasets import Dataset

from hf_models import tiny_llama
from maxdpo import train
from test_trl_parity import ROWS as TRL_STEP_ROWS
from tokenizer_kinds import make_tokenizer

ROWS = TRL_STEP_ROWS + [  # 8 pairs: one global batch over the 8 test devices
    {"prompt": "copy z :", "chosen": " z", "rejected": " z z"},
    {"prompt": "parity of 4 ?", "chosen": " even", "rejected": " odd"},
]
METRICS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
BETA = 0.3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_llama(folder)
    return folder


def trl_first_step(model, tokenizer_folder, tmp) -> dict:
    from transformers import AutoTokenizer

    args = trl.DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=len(ROWS), max_steps=1,
                         logging_steps=1, beta=BETA, max_length=64, report_to=[], use_cpu=True, bf16=False,
                         save_strategy="no")
    trainer = trl.DPOTrainer(model=str(model), args=args, train_dataset=Dataset.from_list(ROWS),
                             processing_class=AutoTokenizer.from_pretrained(tokenizer_folder))
    trainer.train()
    return trainer.state.log_history[0]


def maxdpo_first_step(model, tokenizer_folder, tmp) -> dict:
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    run = tmp / "maxdpo"
    assert train.main([f"model.path={model}", f"tokenizer.path={tokenizer_folder}", f"data.train={data}",
                       "data.eval=null", f"trainer.batch_size={len(ROWS)}", "trainer.epochs=1", "trainer.log_every=1",
                       "data.max_length=64", "data.max_prompt_length=32", f"dpo.beta={BETA}",
                       f"run.output_dir={run}"]) == 0
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("kind", ["adds_bos", "bos_not_added", "no_bos"])
def test_first_step_of_a_whole_run_equals_trls(tmp_path, model, kind):
    tokenizer = make_tokenizer(kind, tmp_path / "tokenizer")
    theirs = trl_first_step(model, tokenizer, tmp_path)
    ours = maxdpo_first_step(model, tokenizer, tmp_path)
    for name in METRICS:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=2e-4, atol=1e-5, err_msg=name)


def _losses(log: list[dict]) -> list[float]:
    return [row["loss"] for row in log if "loss" in row]


def test_tr_dpo_run_equals_trls_sync_ref_model(tmp_path, model):
    """TR-DPO over 6 steps (lr 1e-2, constant): TRL with `sync_ref_model` (reference <- 0.5 x policy + 0.5 x
    reference after steps 2 and 4) and maxdpo with `reference.sync_steps=2 reference.mixup_alpha=0.5` log the
    same loss and margins at every step; a fixed reference would have logged other values from step 3 on."""
    from transformers import AutoTokenizer

    tokenizer = make_tokenizer("adds_bos", tmp_path / "tokenizer")
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(ROWS), max_steps=6,
                         logging_steps=1, beta=BETA, max_length=64, report_to=[], use_cpu=True, bf16=False,
                         save_strategy="no", learning_rate=1e-2, lr_scheduler_type="constant",
                         sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=2)
    trainer = trl.DPOTrainer(model=str(model), args=args, train_dataset=Dataset.from_list(ROWS),
                             processing_class=AutoTokenizer.from_pretrained(tokenizer))
    trainer.train()
    theirs = [row for row in trainer.state.log_history if "loss" in row]

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    runs = {}
    for sync in (2, 0):
        run = tmp_path / f"maxdpo_sync{sync}"
        assert train.main([f"model.path={model}", f"tokenizer.path={tokenizer}", f"data.train={data}",
                           "data.eval=null", f"trainer.batch_size={len(ROWS)}", "trainer.max_steps=6",
                           "trainer.log_every=1", "data.max_length=64", "data.max_prompt_length=32",
                           f"dpo.beta={BETA}", "optimizer.learning_rate=1e-2", "optimizer.schedule=constant",
                           "optimizer.warmup_ratio=0", f"reference.sync_steps={sync}", "reference.mixup_alpha=0.5", f"run.output_dir={run}"]) == 0
        runs[sync] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(theirs) == len(runs[2]) == 6
    for name in ("loss", "rewards/margins", "rewards/chosen"):
        np.testing.assert_allclose([row[name] for row in runs[2]], [row[name] for row in theirs], rtol=2e-3,
                                   atol=1e-4, err_msg=name)
    fixed, synced = np.array(_losses(runs[0])), np.array(_losses(runs[2]))
    np.testing.assert_allclose(fixed[:2], synced[:2], rtol=1e-6)
    assert np.all(np.abs(fixed[2:] - synced[2:]) > 1e-2 * np.abs(synced[2:]))
