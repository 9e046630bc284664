"""Loads preference rows through `datasets`: local files, saved datasets, hub-shaped folders or hub names.

A source is one of
  a file            .json / .jsonl / .parquet / .arrow / .csv (one table; `split` does not apply)
  a saved dataset   a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (split picked)
  a dataset folder  a folder laid out like a hub repository (e.g. data/train-00000-of-00001.parquet)
  a hub name        `owner/name`, loaded with `datasets.load_dataset(name, split=split)`
`bundled:<path>` names a file shipped inside the maxdpo package.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # imported where rows are loaded: `datasets` takes most of a second to import
    import datasets

BUNDLED_PREFIX = "bundled:"
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
TEXT_BUILDERS = ("json", "csv")
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")


class DataError(ValueError):
    """Bad data: the message names the file, row and column."""


def resolve_path(source: str) -> str:
    """`bundled:tiny/train.jsonl` -> the file inside the installed package; other strings unchanged."""
    if source.startswith(BUNDLED_PREFIX):
        return str(importlib.resources.files("maxdpo.assets").joinpath(source[len(BUNDLED_PREFIX):]))
    return source


def _pick_split(loaded, source: str, split: str) -> datasets.Dataset:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{source} has no split '{split}'; it has {sorted(loaded)} (set data.train_split / "
                            "data.eval_split)")
        return loaded[split]
    return loaded


def _load_folder(path: Path, split: str) -> datasets.Dataset:
    import datasets

    if any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        return _pick_split(datasets.load_from_disk(str(path)), str(path), split)
    try:
        return datasets.load_dataset(str(path), split=split)
    except ValueError as err:  # an unknown split, or no data files
        raise DataError(f"could not load dataset folder {path} (split '{split}'): {err}") from err


def load_rows(source: str, split: str = "train") -> datasets.Dataset:
    """The rows of `source` (see the module docstring); a missing file or unknown name is a DataError."""
    import datasets

    path_text = resolve_path(source)
    path = Path(path_text)
    if path.is_dir():
        return _load_folder(path, split)
    builder = LOCAL_BUILDERS.get(path.suffix)
    if builder is not None:
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        if path.stat().st_size == 0:
            raise DataError(f"data file {path} is empty")
        if builder in TEXT_BUILDERS:
            _check_utf8(path)
        try:
            with _datasets_quiet():  # its own traceback of a malformed file would bury the one line below
                return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # a malformed file: name it, and the line where the JSON breaks
            where = _first_bad_json_line(path) if path.suffix == ".jsonl" else None
            raise DataError(f"could not read {path} as {builder}: {where or err}") from err
    if path.exists() or path_text.startswith((".", "/")):
        raise DataError(f"data source {path} is neither a folder nor a file of type {sorted(LOCAL_BUILDERS)}")
    try:
        return datasets.load_dataset(path_text, split=split)
    except Exception as err:  # the hub or its cache: say which name failed and why
        raise DataError(f"could not load dataset '{path_text}' (split '{split}'): {err}") from err


@contextlib.contextmanager
def _datasets_quiet() -> Iterator[None]:
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_utf8(path: Path) -> None:
    """Text files must be UTF-8: `datasets` would read other bytes as replacement characters, silently."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: line {number} is not UTF-8 text (byte {line[err.start:err.start + 1]!r} at "
                                f"column {err.start + 1})") from err


def _first_bad_json_line(path: Path) -> str | None:
    """`line N: <reason>` for the first line of a JSON-lines file that is not a JSON object, or None."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number}: {err.msg} at column {err.colno}"
            if not isinstance(row, dict):
                return f"line {number}: a JSON {type(row).__name__}, not an object"
    return None


def _hash_files(paths: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(paths):
        digest.update(str(file.relative_to(root)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def source_fingerprint(source: str, split: str, rows: datasets.Dataset) -> str:
    """Identifies the data of `source`: a content hash for local files and folders, the dataset's own
    fingerprint (which follows the hub revision) for hub names."""
    path = Path(resolve_path(source))
    if path.is_file():
        return "file:" + _hash_files([path], path.parent)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        return f"folder:{split}:" + _hash_files(files, path)
    return f"hub:{source}:{split}:{rows._fingerprint}"
