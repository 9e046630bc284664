"""Multi-stage runs: a config's `stages:` list chains runs (SFT -> DPO, DPO -> DPO) in one command.

Each stage is a mapping of overrides applied on top of the config's other keys, plus an optional `name`:

    stages:
      - {name: sft, dpo: {loss: sft}, data: {train: sft.jsonl}}
      - {name: dpo, data: {train: prefs.jsonl}, optimizer: {learning_rate: 5.0e-7}}

Stage k runs in `run.output_dir/<k>_<name>`. Stage k+1 starts from stage k's exported weights (its
`hf/` folder, written whatever `export.hf` says) and, unless the stage sets `reference.path`, takes
them as its reference too (the frozen initial policy). A finished stage leaves `stage_complete.json`;
running the config again skips finished stages and resumes the unfinished one from its checkpoints.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from maxdpo.atomic import write_text
from maxdpo.config import Config, ConfigError, apply_mapping, to_dict
from maxdpo.configure import from_dict

log = logging.getLogger("maxdpo")

DONE_FILE = "stage_complete.json"


def _stage_name(index: int, stage: dict) -> str:
    name = str(stage.get("name", f"stage{index + 1}"))
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"stages[{index}].name {name!r} must be a plain folder name")
    return name


def _sets(overrides: dict, section: str, key: str) -> bool:
    value = overrides.get(section)
    return isinstance(value, dict) and key in value


def stage_configs(cfg: Config) -> list[tuple[str, Config]]:
    """(folder, config) of every stage, in order; each validated like a top-level config."""
    if not isinstance(cfg.stages, list) or not all(isinstance(s, dict) for s in cfg.stages):
        raise ConfigError("config key 'stages' must be a list of mappings (overrides per stage)")
    base = {key: value for key, value in to_dict(cfg).items() if key != "stages"}
    root = Path(cfg.run.output_dir)
    result, previous = [], None
    for index, stage in enumerate(cfg.stages):
        overrides = {key: value for key, value in stage.items() if key != "name"}
        if "stages" in overrides:
            raise ConfigError(f"stages[{index}] cannot hold stages of its own")
        if previous is not None and _sets(overrides, "model", "path"):
            raise ConfigError(f"stages[{index}].model.path: a later stage starts from the previous stage's result")
        stage_cfg = from_dict(base)
        apply_mapping(stage_cfg, overrides, prefix=f"stages[{index}].")
        folder = root / f"{index + 1}_{_stage_name(index, stage)}"
        stage_cfg.run.output_dir = str(folder)
        if previous is not None:
            stage_cfg.model.path = str(previous / "hf")
            stage_cfg.model.overrides = {}
            if not _sets(overrides, "reference", "path"):
                stage_cfg.reference.path = None  # the reference is the initial policy: the previous result
        if index < len(cfg.stages) - 1:
            stage_cfg.export.hf = True  # the next stage starts from this export
        result.append((str(folder), from_dict(to_dict(stage_cfg))))  # validated
        previous = folder
    return result


def _write_done(folder: Path, summary: dict) -> None:
    write_text(folder / DONE_FILE, json.dumps(summary, indent=1, default=str))


def run_stages(cfg: Config, run_one: Callable[[Config], dict], is_main: bool = True) -> dict:
    """Runs the stages in order with `run_one` (config -> summary); returns the last stage's summary."""
    summary: dict = {}
    for folder, stage_cfg in stage_configs(cfg):
        done = Path(folder) / DONE_FILE
        if done.is_file():
            log.info("stage %s finished earlier; skipping it", folder)
            summary = json.loads(done.read_text())
            continue
        log.info("stage %s: %s from %s", folder, stage_cfg.dpo.loss, stage_cfg.model.path or "random init")
        summary = run_one(stage_cfg)
        if is_main:
            _write_done(Path(folder), summary)
    return summary
