"""Data: TRL-style tokenisation, truncation, bad rows, deterministic batches."""
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from maxdpo.config import ColumnsConfig
from maxdpo.data.loader import BatchPlan, batched_dataset, eval_dataset
from maxdpo.data.sources import DataError, load_rows, resolve_path
from maxdpo.data.tokenize import PairTokenizer, tokenize_rows


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer"))


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_pair_tokenisation_follows_trl(tokenizer):
    pair, truncated = PairTokenizer(tokenizer, 32, 16)("add 1 + 2 =", " 3", " 4")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = [bos] + _ids(tokenizer, "add 1 + 2 =")
    assert pair.chosen.tolist() == prompt + _ids(tokenizer, "3") + [eos]
    assert pair.rejected.tolist() == prompt + _ids(tokenizer, "4") + [eos]
    assert pair.chosen_prompt_len == pair.rejected_prompt_len == len(prompt)
    assert not truncated


def test_no_double_bos_and_no_double_eos(tokenizer):
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    pair, _ = PairTokenizer(tokenizer, 32, 16)(f"{bos} copy a b :", f" a b {eos}", " a c")
    assert pair.chosen.tolist().count(tokenizer.bos_token_id) == 1
    assert pair.chosen.tolist().count(tokenizer.eos_token_id) == 1
    assert pair.rejected[-1] == tokenizer.eos_token_id


def test_boundary_merge_moves_split_back():
    """With a BPE tokenizer, a prompt ending mid-word merges with the completion; the split moves back."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4, "c": 5}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    core.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    bpe = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    pair, _ = PairTokenizer(bpe, 16, 8)("ca", "b", "c")
    assert pair.chosen.tolist() == [0, 5, 4, 1]  # <s> c | ab </s>: "ab" counts as completion
    assert pair.chosen_prompt_len == 2
    assert pair.rejected.tolist() == [0, 5, 2, 5, 1] and pair.rejected_prompt_len == 3


@pytest.mark.parametrize("mode,kept", [("keep_end", "g h :"), ("keep_start", "copy a b")])
def test_truncation_cuts_prompt_then_completion(tokenizer, mode, kept):
    prompt = "copy a b c d e f g h :"
    pair, truncated = PairTokenizer(tokenizer, 8, 4, mode)(prompt, " a b c d e f", " a b")
    assert truncated
    expected_prompt = [tokenizer.bos_token_id] + _ids(tokenizer, kept)
    assert pair.chosen[:4].tolist() == expected_prompt and pair.chosen_prompt_len == 4
    assert len(pair.chosen) == 8 and pair.chosen[4:].tolist() == _ids(tokenizer, "a b c d")
    assert pair.rejected.tolist() == expected_prompt + _ids(tokenizer, "a b") + [tokenizer.eos_token_id]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("row,message", [
    ({"prompt": "add 1 + 1 =", "rejected": " 3"}, "row 1 has no 'chosen'"),
    ({"prompt": "add 1 + 1 =", "chosen": "  ", "rejected": " 3"}, "row 1 column 'chosen' is empty"),
    ({"prompt": "add 1 + 1 =", "chosen": " 2", "rejected": ""}, "row 1 column 'rejected' is empty"),
])
def test_bad_rows_name_file_and_row(tmp_path, tokenizer, row, message):
    good = {"prompt": "add 1 + 2 =", "chosen": " 3", "rejected": " 4"}
    source = _write_jsonl(tmp_path / "prefs.jsonl", [good, row])
    with pytest.raises(DataError, match=f"prefs.jsonl: {message}"):
        tokenize_rows(load_rows(source), PairTokenizer(tokenizer, 32, 16), ColumnsConfig(), source)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*missing.jsonl"):
        load_rows(str(tmp_path / "missing.jsonl"))


def _pairs(tokenizer, count):
    rows = [{"prompt": f"add {i % 10} + 1 =", "chosen": f" {i % 10 + 1}", "rejected": " 0"} for i in range(count)]
    return tokenize_rows(rows, PairTokenizer(tokenizer, 32, 16), ColumnsConfig(), "inline")[0]


def test_batches_are_deterministic_and_reshuffled_per_epoch(tokenizer):
    pairs = _pairs(tokenizer, 20)
    plan = BatchPlan(batch_size=4, epochs=2, seed=3, shuffle=True, pad_id=0, max_length=32)
    first, again = batched_dataset(pairs, plan), batched_dataset(pairs, plan)
    assert len(first) == 10
    for i in range(len(first)):
        np.testing.assert_array_equal(first[i]["input_ids"], again[i]["input_ids"])
    epoch0 = np.concatenate([first[i]["input_ids"][:, 0] for i in range(5)])
    epoch1 = np.concatenate([first[i]["input_ids"][:, 0] for i in range(5, 10)])
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, epoch1))  # same pairs in each epoch
    assert not np.array_equal(epoch0, epoch1)  # in another order
    other = batched_dataset(pairs, BatchPlan(4, 2, 4, True, 0, 32))
    assert not np.array_equal(first[0]["input_ids"], other[0]["input_ids"])


def test_batch_layout_and_padding(tokenizer):
    pairs = _pairs(tokenizer, 5)
    batch = eval_dataset(pairs, BatchPlan(4, 1, 0, False, 0, 32))[1]  # last batch: 1 pair + 3 filler
    assert batch["input_ids"].shape == (4, 2, 16)  # bucketed length
    assert batch["pair_mask"].tolist() == [1, 0, 0, 0]
    row, mask, seg = batch["input_ids"][0, 0], batch["completion_mask"][0, 0], batch["segment_ids"][0, 0]
    length = len(pairs[4].chosen)
    assert row[:length].tolist() == pairs[4].chosen.tolist() and not row[length:].any()
    assert seg.tolist() == [1] * length + [0] * (16 - length)
    assert mask.nonzero()[0].tolist() == list(range(pairs[4].chosen_prompt_len, length))
