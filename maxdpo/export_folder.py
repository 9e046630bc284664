"""An export's folder holds exactly the exported model: written aside, then put in place whole.

The model, tokenizer and card are written into a hidden staging folder next to the target; once complete it
takes the target's place (a previous export there is replaced whole, so no shard or index of an older
export survives beside the new weights). A target that holds anything else is refused, and a failed export
leaves the target as it was and no staging files behind.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

# What a Hugging Face tokenizer folder may hold. An export copies those present byte for byte, so the exported
# tokenizer is the one training used: saving it again through transformers can change it (5.x drops a
# SentencePiece tokenizer's `legacy` flag, and Mixtral's then splits `[INST]` after `</s>` differently).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
# What an export writes: weights (one file or shards + index), config, card and its curves, tokenizer files.
EXPORT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                   "README.md", "curves.png", *TOKENIZER_FILES)


def is_export(folder: Path) -> bool:
    """A previous export: a config.json, weights, and no file an export does not write."""
    names = [p.name for p in folder.iterdir()]
    return ("config.json" in names and any(name.endswith(".safetensors") for name in names)
            and all((folder / name).is_file() and any(fnmatch.fnmatch(name, p) for p in EXPORT_PATTERNS)
                    for name in names))


def check_target(out: Path) -> None:
    """Raises FileExistsError unless `out` is missing, an empty folder or a previous export."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export target {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        found = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise FileExistsError(f"export target {out} is not empty and holds no previous export ({found}); give an "
                              "empty or new folder")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _left_by_ended_process(out: Path, suffix: str) -> list[Path]:
    """The hidden `.<name>.<pid>.<tag><suffix>` folders next to `out` whose process has ended."""
    found = list(out.parent.glob(f".{out.name}.*.*{suffix}")) if out.parent.is_dir() else []
    pids = [folder.name[len(out.name) + 2:].split(".")[0] for folder in found]
    return [folder for folder, pid in zip(found, pids) if pid.isdigit() and not _alive(int(pid))]


def recover_interrupted(out: Path) -> None:
    """Undoes what an export killed midway left next to `out` (its process has ended): its staging folder is
    removed, and a previous export it had moved aside (killed between the two renames) goes back in place."""
    for folder in _left_by_ended_process(out, ".partial"):
        shutil.rmtree(folder, ignore_errors=True)
    for folder in _left_by_ended_process(out, ".old"):
        if out.exists():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.rename(out)


@contextlib.contextmanager
def export_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yields a staging folder to write the export into; when the block ends it replaces `out` whole."""
    out = Path(out).absolute()
    recover_interrupted(out)
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{secrets.token_hex(4)}"
    staging = out.with_name(f".{out.name}.{tag}.partial")
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            old = out.with_name(f".{out.name}.{tag}.old")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
