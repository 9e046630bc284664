"""Loads preference rows from local json/jsonl/parquet files or a hub dataset name through `datasets`."""
from __future__ import annotations

import importlib.resources
from pathlib import Path

import datasets

BUNDLED_PREFIX = "bundled:"
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad data: the message names the file, row and column."""


def resolve_path(source: str) -> str:
    """`bundled:tiny/train.jsonl` -> the file inside the installed package; other strings unchanged."""
    if source.startswith(BUNDLED_PREFIX):
        return str(importlib.resources.files("maxdpo.assets").joinpath(source[len(BUNDLED_PREFIX):]))
    return source


def load_rows(source: str, split: str = "train") -> datasets.Dataset:
    """A local file (by suffix) or, when no such file exists and it is not path-like, a hub dataset name."""
    path_text = resolve_path(source)
    path = Path(path_text)
    builder = LOCAL_BUILDERS.get(path.suffix)
    if builder is not None:
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.exists() or path_text.startswith((".", "/")):
        raise DataError(f"unsupported data file {path}: expected one of {sorted(LOCAL_BUILDERS)}")
    try:
        return datasets.load_dataset(path_text, split=split)
    except Exception as err:  # the hub or its cache: say which name failed and why
        raise DataError(f"could not load dataset '{path_text}' (split '{split}'): {err}") from err
