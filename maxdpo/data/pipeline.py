"""Rows -> examples -> rendered text -> tokenised pairs, in parallel, cached on disk.

The cache key covers the data (content hash, or the hub dataset's fingerprint), the tokenizer (its full
serialisation and special tokens) and every setting that changes the output, so a second run with the
same inputs loads the pairs at once and any change tokenises afresh. Bad rows raise a DataError naming
the source and row, or with `data.skip_invalid` are dropped and counted; the report (pairs, truncated,
dropped by reason) is logged at every start, cached or not.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import re
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from maxdpo.data.formats import (Example, InvalidRow, RowFormat, as_conversation, detect_format, to_example,
                                 to_unpaired_examples)
from maxdpo.data.sources import DataError, load_rows, source_fingerprint
from maxdpo.data.store import PairStore
from maxdpo.data.templates import ChatRenderer, TemplateError, resolve_template
from maxdpo.data.unpaired import Unpaired, unpaired_order, with_mismatched
from maxdpo.data.tokenize import PairTokenizer

log = logging.getLogger("maxdpo")

CACHE_VERSION = 2  # 2: TRL 1.16's rule (the tokenizer's own special tokens, shared prompt boundary)
CHUNK_ROWS = 1024
MAX_AUTO_PROCESSES = 8


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Everything besides the data and the tokenizer that decides the tokenised pairs."""
    format: str
    columns: tuple[str, ...]
    chat_template: Optional[str]  # Jinja text; None: plain text stays untemplated
    template_setting: str  # as configured (auto, a built-in name, ...), for messages
    system_prompt: Optional[str]
    max_length: int
    max_prompt_length: int
    truncation: str
    skip_invalid: bool
    sft: bool  # prompt / completion examples (dpo.loss: sft): no rejected side
    unpaired: Optional[Unpaired] = None  # labelled single completions (KTO, BCO)

    @classmethod
    def from_config(cls, data_cfg, tokenizer, sft: bool = False,
                    unpaired: Optional[Unpaired] = None) -> "DataSettings":
        columns = data_cfg.columns
        return cls(data_cfg.format, (columns.prompt, columns.chosen, columns.rejected, columns.completion,
                                     columns.label),
                   resolve_template(data_cfg.chat_template, tokenizer), data_cfg.chat_template,
                   data_cfg.system_prompt, data_cfg.max_length, data_cfg.max_prompt_length, data_cfg.truncation,
                   data_cfg.skip_invalid, sft, unpaired)


@dataclasses.dataclass
class ChunkResult:
    pairs: list  # (row index, TokenizedPair, label: 1/0 for an unpaired example, else None)
    # truncated (pairs cut in any way), truncated_prompt, truncated_completion, boundary_moved
    truncation: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    invalid: list = dataclasses.field(default_factory=list)  # (row index, reason)


class PairBuilder:
    """Turns raw rows into tokenised pairs; picklable, so worker processes each hold one."""

    def __init__(self, tokenizer, settings: DataSettings, row_format: RowFormat):
        self.settings = settings
        self.row_format = row_format
        self.tokenizer = PairTokenizer(tokenizer, settings.max_length, settings.max_prompt_length, settings.truncation)
        templated = row_format.kind == "conversational" or settings.template_setting != "auto"
        self.renderer = (ChatRenderer(tokenizer, settings.chat_template, settings.system_prompt) if templated
                         else None)
        if self.renderer is None and tokenizer.eos_token is None:
            raise DataError("the tokenizer has no EOS token; plain-text completions must end with one")

    def _examples(self, row: dict) -> list[tuple[Example, Optional[int]]]:
        """The row's examples with their labels (None: a preference pair or an SFT example)."""
        if self.settings.unpaired is not None:
            return to_unpaired_examples(row, self.row_format)
        return [(to_example(row, self.row_format), None)]

    def _texts(self, example: Example) -> tuple[str, str, Optional[str]]:
        """(prompt, prompt + chosen, prompt + rejected or None) as text, plain or rendered."""
        if self.renderer is None:
            return self.tokenizer.plain_texts(example.prompt, example.chosen, example.rejected)
        example = as_conversation(example)
        try:
            prompt, chosen = self.renderer(example.prompt, example.chosen)
            rejected = None if example.rejected is None else self.renderer(example.prompt, example.rejected)[1]
        except TemplateError as err:
            raise InvalidRow(str(err)) from err
        return prompt, chosen, rejected

    def build(self, rows: list[dict], first_index: int) -> ChunkResult:
        result, texts, indices = ChunkResult([]), [], []
        for offset, row in enumerate(rows):
            try:
                examples = [(self._texts(example), label) for example, label in self._examples(row)]
            except InvalidRow as err:
                result.invalid.append((first_index + offset, str(err)))
                continue
            texts += [text for text, _ in examples]
            indices += [(first_index + offset, label) for _, label in examples]
        outcomes = self.tokenizer.encode_many(texts, rendered=self.renderer is not None)
        failed = {}  # row index -> reason: a row fails whole, whichever of its examples did
        for (index, _), outcome in zip(indices, outcomes):
            if isinstance(outcome, InvalidRow):
                failed.setdefault(index, str(outcome))
        result.invalid += failed.items()
        for (index, label), outcome in zip(indices, outcomes):
            if index in failed:
                continue
            pair, truncation = outcome
            result.pairs.append((index, pair, label))
            result.truncation.update(truncated=truncation.prompt or truncation.completion,
                                     truncated_prompt=truncation.prompt, truncated_completion=truncation.completion,
                                     boundary_moved=truncation.boundary_moved)
        result.invalid.sort()
        return result


_WORKER_BUILDER: Optional[PairBuilder] = None


def _init_worker(builder: PairBuilder) -> None:
    global _WORKER_BUILDER
    _WORKER_BUILDER = builder


def _build_in_worker(job: tuple[int, list[dict]]) -> ChunkResult:
    first_index, rows = job
    return _WORKER_BUILDER.build(rows, first_index)


def _chunks(rows, chunk_rows: int):
    """(first row index, list of row dicts) over the dataset, without loading it whole."""
    first = 0
    for columns in rows.iter(batch_size=chunk_rows):
        names = list(columns)
        chunk = [dict(zip(names, values)) for values in zip(*columns.values())]
        yield first, chunk
        first += len(chunk)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, type(tokenizer).__name__]
    return hashlib.sha256((vocabulary + json.dumps(specials)).encode()).hexdigest()


def cache_directory(data_cfg) -> Path:
    return Path(data_cfg.cache_dir or os.environ.get("MAXDPO_CACHE_DIR") or Path.home() / ".cache" / "maxdpo")


@dataclasses.dataclass
class PreparedData:
    store: PairStore
    report: dict
    fingerprint: str  # identifies source + tokenizer + settings (the cache key)


def _report_line(source: str, report: dict, settings: DataSettings, cached: bool) -> str:
    made = (f"{report['pairs']} unpaired examples ({report['desirable']} desirable)" if "desirable" in report
            else f"{report['pairs']} pairs")
    line = (f"{source}: {report['rows']} rows -> {made}; {report['truncated']} truncated to "
            f"data.max_length={settings.max_length} ({report['truncated_prompt']} prompts cut to "
            f"data.max_prompt_length={settings.max_prompt_length}, {report['truncated_completion']} completions cut); "
            f"{report['dropped']} dropped")
    if report.get("boundary_moved"):
        line += (f"; in {report['boundary_moved']} pairs the completion starts inside the prompt's last tokens (a "
                 "token merges across the boundary, or the template renders a prompt alone differently; as TRL)")
    if report["dropped"]:
        reasons = ", ".join(f"{count} {reason}" for reason, count in report["dropped_by_reason"].items())
        line += f" by data.skip_invalid ({reasons}; first: row {report['first_dropped_row']})"
    return line + (" [cached]" if cached else "")


def _reason_kind(reason: str) -> str:
    """Groups reasons for the report ('the prompt has 90 tokens ...' and '... 95 tokens ...' alike)."""
    return re.sub(r"\d+", "N", reason)


def _settings_key(settings: DataSettings) -> dict:
    """The settings as the cache key holds them: the unpaired-data fields only when set, so the data of runs
    started before they existed keeps its key (and those runs resume)."""
    key = dataclasses.asdict(settings)
    if settings.unpaired is None:
        del key["unpaired"]
        key["columns"] = key["columns"][:3]  # prompt, chosen, rejected
    return key


def _unpaired_store(examples: list, rows: list[int], labels: list[int], unpaired: Unpaired, max_length: int,
                    from_preference_rows: bool) -> PairStore:
    """Unpaired examples in TRL's order, with KTO's mismatched completions when the loss reads them."""
    rows, labels = np.asarray(rows, np.int64), np.asarray(labels, np.int8)
    order = unpaired_order(rows, labels) if from_preference_rows else np.arange(len(rows))
    examples = [examples[i] for i in order]
    if unpaired.kl_chunk:
        examples = with_mismatched(examples, unpaired.kl_chunk, max_length)
    return PairStore.from_pairs(examples, rows[order].tolist(), labels[order].tolist())


def prepare_pairs(source: str, split: str, data_cfg, tokenizer, *, sft: bool = False,
                  unpaired: Optional[Unpaired] = None, show_progress: bool = True,
                  chunk_rows: int = CHUNK_ROWS) -> PreparedData:
    """The tokenised pairs of `source` (from the cache when the same inputs were seen before); with `sft`,
    prompt/completion examples whose rejected side is a stub (see `PairTokenizer`); with `unpaired`, labelled
    examples (`maxdpo.data.unpaired`)."""
    settings = DataSettings.from_config(data_cfg, tokenizer, sft, unpaired)
    rows = load_rows(source, split)
    if len(rows) == 0:
        raise DataError(f"{source} (split '{split}') has no rows")
    row_format = detect_format(rows.features, rows[0], data_cfg.columns, settings.format, source, sft,
                               unpaired is not None)
    if row_format.kind == "conversational" and settings.chat_template is None:
        raise DataError(f"{source} holds conversations but data.chat_template is 'auto' and the tokenizer has no chat "
                        "template; set data.chat_template to llama3, mistral, gemma, vicuna, chatml or a Jinja template")
    if settings.system_prompt and settings.chat_template is None:
        raise DataError("data.system_prompt needs a chat template: set data.chat_template (plain prompts are "
                        "otherwise used as they are)")
    key_content = {"version": CACHE_VERSION, "data": source_fingerprint(source, split, rows),
                   "tokenizer": tokenizer_fingerprint(tokenizer), "settings": _settings_key(settings),
                   "row_format": {k: v for k, v in dataclasses.asdict(row_format).items() if v is not None or
                                  k != "label"}}
    fingerprint = hashlib.sha256(json.dumps(key_content, sort_keys=True).encode()).hexdigest()
    cache_path = cache_directory(data_cfg) / "tokenized" / f"{fingerprint}.npz"
    if data_cfg.cache and cache_path.is_file():
        try:
            store, report = PairStore.load(cache_path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # torn or foreign: a miss
            log.warning("tokenised-data cache %s is unreadable (%s: %s); tokenising again", cache_path,
                        type(err).__name__, err)
        else:
            log.info(_report_line(source, report, settings, cached=True))
            return PreparedData(store, report, fingerprint)

    builder = PairBuilder(tokenizer, settings, row_format)
    processes = data_cfg.num_proc or (min(MAX_AUTO_PROCESSES, os.cpu_count() or 1)
                                      if len(rows) >= MAX_AUTO_PROCESSES * chunk_rows else 1)
    pairs, row_indices, labels, dropped = [], [], [], []
    truncation = collections.Counter(truncated=0, truncated_prompt=0, truncated_completion=0, boundary_moved=0)
    progress = tqdm(total=len(rows), desc=f"tokenising {Path(source).name}", unit="rows", disable=not show_progress)
    pool = (multiprocessing.get_context("spawn").Pool(processes, initializer=_init_worker, initargs=(builder,))
            if processes > 1 else None)
    try:
        results = (pool.imap(_build_in_worker, _chunks(rows, chunk_rows)) if pool is not None
                   else (builder.build(chunk, first) for first, chunk in _chunks(rows, chunk_rows)))
        for result in results:
            if result.invalid and not settings.skip_invalid:
                row, reason = result.invalid[0]
                raise DataError(f"{source}: row {row}: {reason} (set data.skip_invalid: true to skip such rows)")
            dropped += result.invalid
            for index, pair, label in result.pairs:
                row_indices.append(index)
                pairs.append(pair)
                labels.append(label)
            truncation.update(result.truncation)
            progress.update(len({index for index, _, _ in result.pairs}) + len(result.invalid))
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
    if not pairs:
        raise DataError(f"{source}: no valid pairs ({len(dropped)} rows skipped as invalid)")
    report = {"rows": len(rows), "pairs": len(pairs), **truncation, "dropped": len(dropped),
              "dropped_by_reason": dict(collections.Counter(_reason_kind(r) for _, r in dropped)),
              "first_dropped_row": dropped[0][0] if dropped else None}
    if unpaired is None:
        store = PairStore.from_pairs(pairs, row_indices)
    else:
        store = _unpaired_store(pairs, row_indices, labels, unpaired, settings.max_length,
                                from_preference_rows=row_format.label is None)
        report["desirable"] = int(np.sum(store.labels))
    if data_cfg.cache:
        try:
            store.save(cache_path, report)
        except OSError as err:  # a read-only or full cache folder: train without the cache
            log.warning("cannot write the tokenised-data cache %s (%s); training without it", cache_path, err)
    log.info(_report_line(source, report, settings, cached=False))
    return PreparedData(store, report, fingerprint)
