"""Unpaired data (KTO, BCO) from rows to batches: TRL's unpaired rows and preference rows unpaired in TRL's order,
KTO's mismatched completions, bad labels named by row, what the losses refuse, BCO's running reward mean
through a resume. Their values against TRL: test_kto_parity.py and test_bco_parity.py."""
import json

import pytest
from transformers import AutoTokenizer

from maxdpo.checkpoint.state import CheckpointStore
from maxdpo.config import ConfigError, DataConfig
from maxdpo.configure import load_config
from maxdpo.data.pipeline import prepare_pairs
from maxdpo.data.sources import DataError, resolve_path
from maxdpo.data.templates import ChatRenderer, resolve_template
from maxdpo.data.unpaired import UNPAIR_BLOCK, Unpaired
from test_reference_sync import _rows
from test_train_e2e import whole_and_resumed

ROWS = [{"prompt": "add 1 + 2 =", "completion": " 3", "label": True},
        {"prompt": "copy a b :", "completion": " a", "label": False},
        {"prompt": "parity of 7 ?", "completion": " odd", "label": 1},
        {"prompt": "next after a ?", "completion": " z y", "label": 0},
        {"prompt": "add 2 + 2 =", "completion": " 4", "label": True}]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer"))


def _prepare(tmp_path, tokenizer, rows, kl_chunk=0, **data):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = DataConfig(**{"max_length": 32, "max_prompt_length": 16, "cache_dir": str(tmp_path / "cache"), **data})
    return prepare_pairs(str(path), "train", cfg, tokenizer, unpaired=Unpaired(kl_chunk), show_progress=False).store


def _text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_unpaired_rows_keep_their_order_and_labels_and_get_mismatched_completions(tmp_path, tokenizer):
    """Each example is prompt + completion + EOS (as TRL's KTOTrainer tokenises it); KTO's rejected place holds
    its prompt with the completion of the example before it within chunks of 2 ([0, 1], [2, 3], [4])."""
    store = _prepare(tmp_path, tokenizer, ROWS, kl_chunk=2)
    assert store.labels.tolist() == [1, 0, 1, 0, 1] and store.rows.tolist() == [0, 1, 2, 3, 4]
    for index, row in enumerate(ROWS):
        pair = store.pair(index)
        assert _text(tokenizer, pair.chosen) == row["prompt"] + row["completion"]
        assert pair.chosen[-1] == tokenizer.eos_token_id
        partner = {0: 1, 1: 0, 2: 3, 3: 2, 4: 4}[index]
        assert _text(tokenizer, pair.rejected) == row["prompt"] + ROWS[partner]["completion"]
        assert pair.rejected_prompt_len == pair.chosen_prompt_len


def test_without_a_kl_term_the_rejected_place_is_a_stub(tmp_path, tokenizer):
    store = _prepare(tmp_path, tokenizer, ROWS)
    assert store.lengths[:, 1].tolist() == [1] * len(ROWS)


def test_preference_rows_are_unpaired_in_trls_order(tmp_path, tokenizer):
    """Per block of 1000 rows every chosen completion (desirable), then every rejected one, as TRL's
    unpair_preference_dataset; a bundled-style file of 1003 rows shows the block boundary."""
    rows = [{"prompt": f"copy {i % 10} :", "chosen": f" {i % 10}", "rejected": f" {(i + 1) % 10}"}
            for i in range(UNPAIR_BLOCK + 3)]
    store = _prepare(tmp_path, tokenizer, rows)
    block = list(range(UNPAIR_BLOCK))
    assert store.rows.tolist() == block * 2 + [1000, 1001, 1002] * 2
    assert store.labels.tolist() == [1] * UNPAIR_BLOCK + [0] * UNPAIR_BLOCK + [1, 1, 1, 0, 0, 0]
    assert _text(tokenizer, store.pair(UNPAIR_BLOCK).chosen) == "copy 0 : 1"


def test_conversational_unpaired_rows_render_the_chat_template(tmp_path, tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "add 1 + 2 ="}],
             "completion": [{"role": "assistant", "content": "3"}], "label": False}]
    store = _prepare(tmp_path, tokenizer, rows, chat_template="chatml")
    _, text = ChatRenderer(tokenizer, resolve_template("chatml", tokenizer), None)(rows[0]["prompt"],
                                                                                   rows[0]["completion"])
    assert store.labels.tolist() == [0]
    assert store.pair(0).chosen.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("label", ["yes", 2, None])
def test_a_bad_label_names_the_row(tmp_path, tokenizer, label):
    rows = ROWS[:2] + [{"prompt": "add 1 + 1 =", "completion": " 2", "label": label}]
    with pytest.raises(DataError, match=r"rows.jsonl: row 2: 'label' must be true or false"):
        _prepare(tmp_path, tokenizer, rows)


def test_unpaired_rows_without_a_completion_column_are_named(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"unpaired rows need columns \['completion'\]"):
        _prepare(tmp_path, tokenizer, [{"prompt": "a", "answer": " b", "label": True}])


def test_a_preference_row_whose_rejected_side_fails_drops_whole(tmp_path, tokenizer):
    """With data.skip_invalid a preference row is dropped with both its examples, not only the failing one."""
    rows = [{"prompt": "add 1 + 2 =", "chosen": " 3", "rejected": " 4"},
            {"prompt": "add 1 + 1 =", "chosen": " 2", "rejected": "  "}]
    store = _prepare(tmp_path, tokenizer, rows, skip_invalid=True)
    assert store.rows.tolist() == [0, 0] and store.labels.tolist() == [1, 0]


@pytest.mark.parametrize("options,message", [
    (["dpo.loss=kto", "trainer.micro_batch_size=1"], "needs trainer.micro_batch_size >= 2"),
    (["dpo.loss=kto", "dpo.sft_weight=0.5"], "apply to preference pairs only"),
    (["dpo.loss=bco", "dpo.use_weighting=true"], "apply to preference pairs only"),
    (["dpo.loss=[kto, sigmoid]"], "not mixed with pair losses"),
    (["dpo.loss=sigmoid", "dpo.desirable_weight=1.3"], "'dpo.desirable_weight' is used by the losses"),
    (["dpo.loss=bco", "dpo.undesirable_weight=0.5"], "'dpo.undesirable_weight' is used by the losses"),
    (["dpo.loss=kto", "dpo.desirable_weight=-1"], "must be >= 0"),
])
def test_what_unpaired_losses_cannot_take_is_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, options)


def test_a_bco_run_resumes_with_its_running_reward_mean(tmp_path):
    """Losing everything after the step-3 checkpoint and rerunning logs the uninterrupted run's metrics, delta
    (the running mean of every reward so far) included; a restart from no rewards would log another delta."""
    args = ["dpo.loss=bco", "trainer.max_steps=6", "trainer.batch_size=8", "trainer.log_every=1",
            "trainer.save_every=3", "data.eval=null", "optimizer.learning_rate=1e-2", "optimizer.warmup_ratio=0"]
    whole, resumed = whole_and_resumed(tmp_path, args, 6)
    rows = _rows(whole)
    assert _rows(resumed) == rows
    assert len({row["delta"] for row in rows}) == 6
    store = CheckpointStore(whole / "checkpoints", 3)
    assert store.read_meta(3)["reward_moments"]["count"] == 3 * 8  # examples seen by step 3
    store.close()
