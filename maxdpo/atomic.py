"""Atomic file writes: readers see the old file or the complete new one, never a partial write.

The temporary file lives next to the target and is named `<name>.<pid>.<random>.tmp`: unique per process
(processes of a multi-host run may write the same file on a shared file system), and never matching the
target's own pattern (`*.safetensors`, `*.npy`), so a file left by a killed process is never read as one.
Writers that append a suffix to a path (np.save, np.savez) are given an open file instead.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; once the block ends it is synced to disk and renamed onto `path`.
    If the block raises, the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
