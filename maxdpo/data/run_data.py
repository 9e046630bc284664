"""A run's data: its tokenizer, and its train (and eval) pairs tokenised and scheduled into batches."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from transformers import AutoTokenizer

from maxdpo.atomic import write_text
from maxdpo.config import Config, ConfigError
from maxdpo.data.loader import BatchBuilder, BatchPlan, eval_schedule, training_schedule
from maxdpo.data.pipeline import PreparedData, prepare_pairs
from maxdpo.data.sources import DataError, resolve_path
from maxdpo.data.templates import resolve_template
from maxdpo.data.unpaired import Unpaired
from maxdpo.dpo.losses import loss_record
from maxdpo.export_folder import TOKENIZER_FILES


def tokenizer_folder(cfg: Config) -> Path:
    source = cfg.tokenizer.path or cfg.model.path
    if not source:
        raise ConfigError("no tokenizer: set tokenizer.path (or model.path to a folder with tokenizer files)")
    path = Path(resolve_path(source))
    if not path.exists():
        raise ConfigError(f"tokenizer path not found: {path}")
    return path


def load_tokenizer(cfg: Config):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(cfg))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def export_tokenizer(cfg: Config, out: Path) -> None:
    """The run's tokenizer files (`TOKENIZER_FILES`), copied into `out`; with a chat template other than the
    tokenizer's own, the one training rendered with as chat_template.jinja (which transformers loads in place
    of the config's)."""
    folder = tokenizer_folder(cfg)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    if cfg.data.chat_template != "auto":
        write_text(out / "chat_template.jinja", resolve_template(cfg.data.chat_template, tokenizer=None))


def check_vocab(vocab_size: int, tokenizer) -> None:
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}")


def check_token_ids(prepared: PreparedData, source: str, vocab_size: int) -> None:
    """Every token id indexes the model's embedding: an id at or above vocab_size (a tokenizer that does not
    match the model) would make the loss NaN, so it stops the run naming the row."""
    tokens = prepared.store.tokens
    outside = np.flatnonzero(tokens >= vocab_size)
    if len(outside):
        sequence = np.searchsorted(prepared.store.starts.ravel(), outside[0], side="right") - 1
        row = int(prepared.store.rows[sequence // 2])
        raise DataError(f"{source}: row {row}: token id {int(tokens[outside[0]])} is not below the model's vocab_size "
                        f"{vocab_size}; the tokenizer does not match the model")


def prepare_data(source: str, split: str, cfg: Config, tokenizer) -> PreparedData:
    """Tokenised pairs of a data source (cached on disk; progress shown by the first process), or an unpaired
    loss's examples (KTO's mismatched completions rotated within chunks of trainer.micro_batch examples)."""
    loss = loss_record(cfg.dpo.objective)
    unpaired = Unpaired(cfg.trainer.micro_batch if loss.anchor == "kl" else 0) if loss.unpaired else None
    return prepare_pairs(source, split, cfg.data, tokenizer, sft=loss.completions, unpaired=unpaired,
                         show_progress=jax.process_index() == 0)


def batch_plan(cfg: Config, tokenizer, shuffle: Optional[bool] = None, batch_size: Optional[int] = None) -> BatchPlan:
    return BatchPlan(batch_size=batch_size or cfg.trainer.batch_size, epochs=cfg.trainer.epochs,
                     seed=cfg.run.seed, shuffle=cfg.data.shuffle if shuffle is None else shuffle,
                     pad_id=tokenizer.pad_token_id, max_length=cfg.data.max_length, packing=cfg.data.packing,
                     prefix_sharing=cfg.data.prefix_sharing)


def schedule_fingerprint(data: PreparedData, plan: BatchPlan) -> str:
    """Identifies the batch sequence: the data and how it is batched."""
    content = json.dumps([data.fingerprint, dataclasses.asdict(plan)], sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class RunData:
    """Batch builders of this process's share: training (shuffled global batches) and evaluation (every pair
    once, in micro batches); `fingerprints` identify each split's tokenised data."""
    train: BatchBuilder
    eval: Optional[BatchBuilder]
    schedule_fingerprint: str  # the training batch sequence, checked on resume
    fingerprints: dict[str, str]

    def builders(self) -> dict[str, BatchBuilder]:
        return {"train": self.train, **({"eval": self.eval} if self.eval is not None else {})}

    def total_steps(self, max_steps: int) -> int:
        """Steps of the run: every scheduled batch, or at most `max_steps` (trainer.max_steps) when >= 0."""
        scheduled = len(self.train.schedule)
        return scheduled if max_steps < 0 else min(max_steps, scheduled)


def prepare_run_data(cfg: Config, tokenizer, vocab_size: int) -> RunData:
    if not cfg.data.train:
        raise ConfigError("data.train is not set")
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    plan = batch_plan(cfg, tokenizer)
    train = prepare_data(cfg.data.train, cfg.data.train_split, cfg, tokenizer)
    check_token_ids(train, cfg.data.train, vocab_size)
    builder = BatchBuilder(train.store, training_schedule(train.store, plan), plan, **process)
    fingerprints = {"train": train.fingerprint}
    eval_builder = None
    if cfg.data.eval:
        eval_plan = batch_plan(cfg, tokenizer, shuffle=False, batch_size=cfg.trainer.micro_batch)
        evaluation = prepare_data(cfg.data.eval, cfg.data.eval_split, cfg, tokenizer)
        check_token_ids(evaluation, cfg.data.eval, vocab_size)
        eval_builder = BatchBuilder(evaluation.store, eval_schedule(evaluation.store, eval_plan), eval_plan, **process)
        fingerprints["eval"] = evaluation.fingerprint
    return RunData(builder, eval_builder, schedule_fingerprint(train, plan), fingerprints)


def every_pair_once(builder: BatchBuilder, batch_size: int) -> BatchBuilder:
    """`builder`'s pairs in order, each once, in batches of `batch_size` rows (the precompute pass)."""
    plan = dataclasses.replace(builder.plan, shuffle=False, batch_size=batch_size)
    return dataclasses.replace(builder, schedule=eval_schedule(builder.store, plan), plan=plan)
