"""SFT (`dpo.loss: sft`): prompt/completion and conversation data, and a step whose loss is transformers' own."""
import json

import numpy as np
import pytest
import torch

from hf_models import tiny_llama
from maxdpo.data.run_data import load_tokenizer, prepare_data
from maxdpo.config import ConfigError
from maxdpo.configure import load_config
from maxdpo.data.formats import InvalidRow, RowFormat, to_example
from maxdpo.trainer import Trainer

BUNDLED = ["tokenizer.path=bundled:tiny/tokenizer", "data.max_length=32", "data.max_prompt_length=16"]
ROWS = [{"prompt": "copy m z j :", "completion": " m z j"}, {"prompt": "add 8 + 2 =", "completion": " 1 0"},
        {"prompt": "parity of 6 0 4 8 ?", "completion": " even"}, {"prompt": "next after s ?", "completion": " t"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _store(tmp_path, rows, *extra):
    cfg = load_config(None, BUNDLED + [f"data.train={_jsonl(tmp_path / 'd.jsonl', rows)}", "dpo.loss=sft",
                                       *extra])
    tokenizer = load_tokenizer(cfg)
    return prepare_data(cfg.data.train, "train", cfg, tokenizer).store, tokenizer


def test_prompt_completion_rows_tokenise_like_the_chosen_side_of_a_pair(tmp_path):
    sft, tokenizer = _store(tmp_path, ROWS)
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " x"} for r in ROWS]
    cfg = load_config(None, BUNDLED + [f"data.train={_jsonl(tmp_path / 'p.jsonl', pairs)}"])
    dpo = prepare_data(cfg.data.train, "train", cfg, tokenizer).store
    for index in range(len(ROWS)):
        got, want = sft.pair(index), dpo.pair(index)
        np.testing.assert_array_equal(got.chosen, want.chosen)
        assert got.chosen_prompt_len == want.chosen_prompt_len and got.chosen[-1] == tokenizer.eos_token_id
        assert len(got.rejected) == got.rejected_prompt_len == 1  # the stub: no completion tokens
    preference, _ = _store(tmp_path, pairs)  # preference rows train on their chosen side
    np.testing.assert_array_equal(preference.tokens[preference.starts[0, 0]:][:len(sft.pair(0).chosen)],
                                  sft.pair(0).chosen)


def test_conversations_train_on_the_last_assistant_turn():
    fmt = RowFormat("conversational", None, "messages", None)
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "add 1 + 1"},
             {"role": "assistant", "content": "2"}]
    example = to_example({"messages": turns}, fmt)
    assert example.prompt == turns[:4] and example.chosen == turns[4:] and example.rejected is None
    with pytest.raises(InvalidRow, match="no assistant message"):
        to_example({"messages": turns[:2]}, fmt)


def test_sft_refuses_a_reference():
    with pytest.raises(ConfigError, match="without a reference"):
        load_config(None, ["dpo.loss=sft", "reference.precompute=true"])


def test_sft_step_loss_is_transformers_causal_lm_loss(tmp_path):
    """The logged loss of step 1 (before the update) is HF's mean cross-entropy over the completion tokens."""
    model = tiny_llama(tmp_path / "hf")
    run = tmp_path / "run"
    cfg = load_config(None, BUNDLED + [
        f"data.train={_jsonl(tmp_path / 'd.jsonl', ROWS * 2)}", "dpo.loss=sft", "model.path=" + str(tmp_path / "hf"),
        "model.overrides=null", f"run.output_dir={run}", "trainer.batch_size=8", "trainer.max_steps=1",
        "trainer.log_every=1", "data.shuffle=false", "export.hf=false", "mesh.data=2", "mesh.fsdp=2",
        "mesh.tensor=2"])
    trainer = Trainer(cfg)
    assert not trainer.program.reference_model  # no reference weights on the device
    summary = trainer.train()
    assert set(summary["train"]) >= {"loss", "logps/chosen", "logits/chosen"}
    assert not any(name.startswith("rewards/") or name.endswith("rejected") for name in summary["train"])

    store = trainer.data.train.store
    sequences = [store.pair(i) for i in range(len(store))]
    length = max(len(p.chosen) for p in sequences)
    ids = np.zeros((len(sequences), length), np.int64)
    labels = np.full((len(sequences), length), -100, np.int64)
    mask = np.zeros((len(sequences), length), np.int64)
    for row, pair in enumerate(sequences):
        ids[row, :len(pair.chosen)] = pair.chosen
        labels[row, pair.chosen_prompt_len:len(pair.chosen)] = pair.chosen[pair.chosen_prompt_len:]
        mask[row, :len(pair.chosen)] = 1
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         labels=torch.tensor(labels)).loss.item()
    np.testing.assert_allclose(summary["train"]["loss"], expected, rtol=2e-5)
