"""maxdpo.atomic: the target appears whole or not at all, and no temporary file is left behind."""
import os

import numpy as np
import pytest

from maxdpo import atomic
from maxdpo.atomic import atomic_path, write_text


def test_write_text_replaces_the_target_whole(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    write_text(target, "x" * 100_000)
    assert target.read_text() == "x" * 100_000
    assert os.listdir(tmp_path) == ["out.json"]


def test_temporary_file_is_per_process_and_next_to_the_target(tmp_path):
    target = tmp_path / "table.npy"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first.parent == tmp_path and str(os.getpid()) in first.name
        assert first != second  # concurrent writers of one file never share a temporary file
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first"  # the last writer to finish wins
    assert os.listdir(tmp_path) == ["table.npy"]


def test_a_left_over_temporary_file_never_matches_the_target_pattern(tmp_path):
    with atomic_path(tmp_path / "model.safetensors") as tmp:
        assert tmp.name.endswith(".tmp") and not tmp.match("*.safetensors")
        tmp.write_bytes(b"x")


def test_failed_write_leaves_the_target_and_no_temporary_file(tmp_path):
    target = tmp_path / "stage_complete.json"
    target.write_text("previous")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "previous"
    assert os.listdir(tmp_path) == ["stage_complete.json"]


def test_numpy_writers_write_exactly_the_target(tmp_path):
    table = np.arange(6, dtype=np.float32).reshape(3, 2)
    with atomic_path(tmp_path / "ref.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, table)  # a path would get .npy appended
    with atomic_path(tmp_path / "pairs.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, table=table)
    assert sorted(os.listdir(tmp_path)) == ["pairs.npz", "ref.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "ref.npy"), table)
    with np.load(tmp_path / "pairs.npz") as content:
        np.testing.assert_array_equal(content["table"], table)


def test_file_is_synced_before_it_replaces_the_target(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: calls.append("replace") or real_replace(src, dst))
    write_text(tmp_path / "config.json", "{}")
    assert calls == ["fsync", "replace"]
