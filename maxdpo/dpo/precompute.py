"""`reference.precompute: true`: the reference model's log-probs of every pair, computed in one pass and
cached in the run folder (`reference_logps/<split>-<key>.npy`), so training holds no reference weights.

The key covers the tokenised data and the reference's identity (its weights' files, or the random init,
and the compute dtype), so a resumed run reuses the table and a changed reference recomputes it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from maxdpo.atomic import atomic_path
from maxdpo.config import Config
from maxdpo.data.loader import BatchBuilder
from maxdpo.data.run_data import RunData, every_pair_once
from maxdpo.data.sources import resolve_path
from maxdpo.program import TrainProgram

log = logging.getLogger("maxdpo")


def _folder_identity(path: str) -> list:
    """Name, size and modification time of each weights file of an HF folder."""
    folder = Path(resolve_path(path))
    return [str(folder.absolute())] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                       for p in sorted(folder.glob("*.safetensors"))]


def reference_identity(cfg: Config) -> list:
    """What determines the reference's log-probs besides the data."""
    source = cfg.reference.path or cfg.model.path
    weights = _folder_identity(source) if source else ["random init", cfg.run.seed, cfg.model.family,
                                                        cfg.model.overrides]
    quantized = [cfg.lora.quantize] if cfg.lora.quantize else []  # a QLoRA reference is the NF4 base
    return [weights, cfg.model.dtype, cfg.model.param_dtype, *quantized]


def cache_path(run_dir: Path, split: str, data_fingerprint: str, cfg: Config) -> Path:
    key = hashlib.sha256(json.dumps([data_fingerprint, reference_identity(cfg)], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    return run_dir / "reference_logps" / f"{split}-{key}.npy"


def compute_table(program: TrainProgram, ref_params: dict, builder: BatchBuilder) -> np.ndarray:
    """[pairs, 2] reference logps (chosen, rejected) of every pair of `builder`'s store.

    `builder` walks an evaluation schedule (every pair once); `program.reference_logps` returns the logps of
    the whole global batch on every process.
    """
    table = np.full((len(builder.store), 2), np.nan, np.float32)
    for step in range(len(builder.schedule)):
        logps = np.asarray(program.reference_logps(ref_params, program.global_batch(builder(step))))  # [B*K, 2]
        pairs = builder.schedule.rows[step].reshape(-1)  # global pair index of each slot
        table[pairs[pairs >= 0]] = logps[pairs >= 0]
    if np.isnan(table).any():
        raise RuntimeError("the reference precompute pass missed pairs; this is a bug in the batch schedule")
    return table


def load_or_compute(path: Path, compute: Callable[[], np.ndarray], what: str) -> np.ndarray:
    """The cached table at `path`, or a computed one written there atomically. Every process writes it
    (same content), so each finds it on resume whether or not the run folder is on a shared file system."""
    if path.is_file():
        log.info("reference logps for %s: cached in %s", what, path)
        return np.load(path)
    log.info("reference logps for %s: one pass of the reference model", what)
    table = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, table)
    return table


def attach_reference_logps(program: TrainProgram, data: RunData, ref_params: dict, run_dir: Path) -> RunData:
    """`data` whose batches carry the reference's logps, cached (or computed now, every pair once in micro
    batches); the reference weights are needed only during this pass."""
    builders = {}
    for split, builder in data.builders().items():
        path = cache_path(run_dir, split, data.fingerprints[split], program.cfg)
        walk = every_pair_once(builder, program.cfg.trainer.micro_batch)
        table = load_or_compute(path, lambda: compute_table(program, ref_params, walk), f"data.{split}")
        builders[split] = dataclasses.replace(builder, reference_logps=table)
    return dataclasses.replace(data, **builders)
