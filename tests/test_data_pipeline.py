"""Bad rows (error vs skip_invalid), the tokenisation cache and parallel tokenisation."""
import json
import logging

import numpy as np
import pytest
from transformers import AutoTokenizer

from maxdpo.config import DataConfig
from maxdpo.data import pipeline
from maxdpo.data.pipeline import prepare_pairs
from maxdpo.data.sources import DataError, resolve_path

GOOD = {"prompt": "add 1 + 2 =", "chosen": " 3", "rejected": " 4"}
BAD_ROWS = [  # (row, reason)
    ({"prompt": "add 1 + 1 =", "rejected": " 3"}, "'chosen' is missing"),
    ({"prompt": "add 1 + 1 =", "chosen": "  ", "rejected": " 3"}, "'chosen' is empty"),
    ({"prompt": "add 1 + 1 =", "chosen": " 2", "rejected": " 2"}, "chosen and rejected are identical"),
    ({"prompt": "copy a b c d e f g h i j k l m n o p q r s t u v w x :", "chosen": " a", "rejected": " b"},
     "the prompt has 27 tokens, more than data.max_length=24"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer"))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp_path, **overrides):
    return DataConfig(**{"max_length": 24, "max_prompt_length": 12, "cache_dir": str(tmp_path / "cache"), **overrides})


@pytest.mark.parametrize("index", range(len(BAD_ROWS)))
def test_a_bad_row_is_an_error_naming_file_and_row(tmp_path, tokenizer, index):
    row, reason = BAD_ROWS[index]
    source = _write(tmp_path / "prefs.jsonl", [GOOD, GOOD, row, GOOD])
    with pytest.raises(DataError, match=f"prefs.jsonl: row 2: {reason}.*data.skip_invalid"):
        prepare_pairs(source, "train", _config(tmp_path), tokenizer, show_progress=False)


def test_a_column_of_mixed_types_is_refused_by_name(tmp_path, tokenizer):
    """datasets would load strings beside lists as JSON and turn " 3" into 3: refuse instead."""
    source = _write(tmp_path / "prefs.jsonl", [GOOD, {"prompt": "add 1 + 1 =", "chosen": [" 2"], "rejected": " 3"}])
    with pytest.raises(DataError, match="prefs.jsonl: column 'chosen' mixes value types"):
        prepare_pairs(source, "train", _config(tmp_path), tokenizer, show_progress=False)


def test_skip_invalid_drops_and_counts_every_bad_row(tmp_path, tokenizer, caplog):
    rows = [GOOD] + [row for row, _ in BAD_ROWS] + [GOOD]
    source = _write(tmp_path / "prefs.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="maxdpo"):
        prepared = prepare_pairs(source, "train", _config(tmp_path, skip_invalid=True), tokenizer, show_progress=False)
    assert prepared.store.rows.tolist() == [0, len(rows) - 1]
    report = prepared.report
    assert report["rows"] == len(rows) and report["pairs"] == 2 and report["dropped"] == len(BAD_ROWS)
    assert report["first_dropped_row"] == 1 and sum(report["dropped_by_reason"].values()) == len(BAD_ROWS)
    assert "the prompt has N tokens, more than data.max_length=N" in report["dropped_by_reason"]
    assert f"{len(rows)} rows -> 2 pairs" in caplog.text and f"{len(BAD_ROWS)} dropped by data.skip_invalid" in caplog.text


def test_truncation_is_counted_and_reported(tmp_path, tokenizer, caplog):
    long_prompt = {"prompt": "copy a b c d e f g h i j k l m n o p q r s :", "chosen": " a b", "rejected": " a"}
    long_answer = {"prompt": "copy a b :", "chosen": " a b a b a b a b a b a b a b a b a b a b", "rejected": " a"}
    source = _write(tmp_path / "prefs.jsonl", [GOOD, long_prompt, long_answer])
    with caplog.at_level(logging.INFO, logger="maxdpo"):
        report = prepare_pairs(source, "train", _config(tmp_path), tokenizer, show_progress=False).report
    assert (report["truncated"], report["truncated_prompt"], report["truncated_completion"]) == (2, 1, 1)
    assert "2 truncated to data.max_length=24 (1 prompts cut" in caplog.text


def test_second_run_reads_the_cache_and_any_change_misses_it(tmp_path, tokenizer, monkeypatch, caplog):
    source = _write(tmp_path / "prefs.jsonl", [GOOD, {**GOOD, "chosen": " 5"}])
    first = prepare_pairs(source, "train", _config(tmp_path), tokenizer, show_progress=False)

    def no_tokenising(*args):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(pipeline.PairBuilder, "build", no_tokenising)
    with caplog.at_level(logging.INFO, logger="maxdpo"):
        again = prepare_pairs(source, "train", _config(tmp_path), tokenizer, show_progress=False)
    assert "[cached]" in caplog.text and again.fingerprint == first.fingerprint
    assert np.array_equal(again.store.tokens, first.store.tokens) and again.report == first.report
    monkeypatch.undo()

    changed = [prepare_pairs(source, "train", _config(tmp_path, max_length=20), tokenizer, show_progress=False),
               prepare_pairs(source, "train", _config(tmp_path, truncation="keep_start"), tokenizer,
                             show_progress=False),
               prepare_pairs(source, "train", _config(tmp_path, chat_template="chatml"), tokenizer, show_progress=False)]
    _write(tmp_path / "prefs.jsonl", [GOOD, {**GOOD, "chosen": " 6"}])  # same size, new content
    changed.append(prepare_pairs(source, "train", _config(tmp_path), tokenizer, show_progress=False))
    other_tokenizer = AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer"))
    other_tokenizer.add_tokens(["extra"])
    changed.append(prepare_pairs(source, "train", _config(tmp_path), other_tokenizer, show_progress=False))
    fingerprints = {first.fingerprint} | {c.fingerprint for c in changed}
    assert len(fingerprints) == 1 + len(changed)
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.npz"))) == len(fingerprints)


def test_cache_off_writes_nothing(tmp_path, tokenizer):
    source = _write(tmp_path / "prefs.jsonl", [GOOD])
    prepare_pairs(source, "train", _config(tmp_path, cache=False), tokenizer, show_progress=False)
    assert not (tmp_path / "cache").exists()


def test_parallel_tokenisation_equals_serial(tmp_path, tokenizer):
    """Two worker processes over 7 chunks give the same pairs, in order, and the same first error."""
    rows = [{"prompt": f"add {i % 10} + {i % 7} =", "chosen": f" {i % 10 + i % 7}", "rejected": f" {i % 10 + i % 7 + 1}"}
            for i in range(200)]
    source = _write(tmp_path / "prefs.jsonl", rows)
    serial = prepare_pairs(source, "train", _config(tmp_path, cache=False, num_proc=1), tokenizer,
                           show_progress=False, chunk_rows=30)
    parallel = prepare_pairs(source, "train", _config(tmp_path, cache=False, num_proc=2), tokenizer,
                             show_progress=False, chunk_rows=30)
    for name in ("tokens", "starts", "lengths", "prompt_lengths", "rows"):
        assert np.array_equal(getattr(serial.store, name), getattr(parallel.store, name)), name
    rows[95] = {**rows[95], "rejected": rows[95]["chosen"]}
    _write(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError, match="row 95: chosen and rejected are identical"):
        prepare_pairs(source, "train", _config(tmp_path, cache=False, num_proc=2), tokenizer, show_progress=False,
                      chunk_rows=30)


@pytest.mark.parametrize("damage", ["torn", "empty", "foreign"])
def test_an_unreadable_cache_file_is_a_miss_and_is_rebuilt(tmp_path, tokenizer, caplog, damage):
    source = _write(tmp_path / "prefs.jsonl", [GOOD, {**GOOD, "chosen": " 5"}])
    first = prepare_pairs(source, "train", _config(tmp_path), tokenizer, show_progress=False)
    (cache_file,) = (tmp_path / "cache" / "tokenized").glob("*.npz")
    content = cache_file.read_bytes()
    cache_file.write_bytes({"torn": content[:len(content) // 2], "empty": b"",
                            "foreign": b"PK\x03\x04 not a zip at all"}[damage])
    with caplog.at_level(logging.WARNING, logger="maxdpo"):
        again = prepare_pairs(source, "train", _config(tmp_path), tokenizer, show_progress=False)
    assert f"tokenised-data cache {cache_file} is unreadable" in caplog.text
    assert np.array_equal(again.store.tokens, first.store.tokens)
    assert cache_file.read_bytes() == content  # rebuilt whole


def test_a_cache_folder_that_cannot_be_written_means_no_cache(tmp_path, tokenizer, caplog):
    source = _write(tmp_path / "prefs.jsonl", [GOOD])
    (tmp_path / "not_a_folder").write_text("")
    with caplog.at_level(logging.WARNING, logger="maxdpo"):
        prepared = prepare_pairs(source, "train", _config(tmp_path, cache_dir=str(tmp_path / "not_a_folder")), tokenizer,
                                 show_progress=False)
    assert "cannot write the tokenised-data cache" in caplog.text and "training without it" in caplog.text
    assert len(prepared.store) == 1
