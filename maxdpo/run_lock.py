"""One writer per run folder: an exclusive lock on `RUN_DIR/.lock` for as long as a run (or an export into
it) writes there.

The lock is the operating system's (`flock`): it goes when its process does, however it ends, so the lock
of a dead process is taken over at once; the file only records who holds it, for the message a second
writer gets. In a multi-process run the first process takes it (it alone writes the run's files).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

log = logging.getLogger("maxdpo")

LOCK_NAME = ".lock"


class RunFolderInUse(RuntimeError):
    """Another process writes this run folder; the message names it."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, take: bool = True) -> Iterator[None]:
    """Holds the lock of `run_dir` (created if missing) for the block; `take=False` (processes other than
    the first) holds nothing."""
    if not take:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _holder(path)
            raise RunFolderInUse(
                f"{run_dir} is in use by process {other.get('pid', '?')} on {other.get('host', '?')} (since "
                f"{other.get('since', '?')}: {other.get('command', '?')}); wait for it to end or set another "
                "run.output_dir") from None
        previous = _holder(path)
        if previous:
            log.info("run folder %s: taking over the lock of process %s on %s, which has ended", run_dir,
                     previous.get("pid"), previous.get("host"))
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.datetime.now().isoformat(timespec="seconds"),
                                 "command": " ".join(sys.argv)}).encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
