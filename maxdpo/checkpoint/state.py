"""Orbax training checkpoints: `checkpoints/<step>/{params, opt_state, meta}`.

Orbax writes each step into a temporary folder and renames it when complete, so a crash mid-save never
leaves a half checkpoint that resume would pick; an existing step is never written over.
`meta` (JSON) carries the step, the model architecture and the resolved config, so a checkpoint alone is
enough to export it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from maxdpo.checkpoint.safetensors_io import CheckpointError



class CheckpointStore:
    """Saves and restores training state under `<run>/checkpoints`."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep if keep > 0 else None, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        if step in self.manager.all_steps():
            raise FileExistsError(f"checkpoint for step {step} already exists in {self.directory}; not overwriting")
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({**meta, "step": step})))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any = None) -> dict:
        """Restores params (and opt_state when its abstract tree is given) with their shardings."""
        items = {"params": ocp.args.StandardRestore(abstract_params)}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        return dict(self.manager.restore(step, args=ocp.args.Composite(**items)).items())

    def set_aside(self, step: int, move: bool = True) -> None:
        """Renames a damaged step's folder to `<step>.damaged` (`move`: this process does the renaming; all
        processes then stop counting the step)."""
        if move:
            folder = self.directory / str(step)
            folder.rename(folder.with_name(f"{step}.damaged"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def latest_meta(directory: str | Path) -> Optional[tuple[int, dict]]:
    """(step, meta) of the newest complete checkpoint under `directory` whose meta reads, or None when there is
    no checkpoint; creates nothing. Checkpoints that all fail to read are an error, never a fresh start."""
    if not Path(directory).is_dir():
        return None
    store = CheckpointStore(directory)
    try:
        steps = store.steps()
        for step in steps:
            try:
                return step, store.read_meta(step)
            except Exception:  # a damaged meta: the trainer sets the step aside when it restores
                continue
        if steps:
            raise CheckpointError(f"none of the checkpoints in {directory} (steps {sorted(steps)}) can be read; "
                                  "move them away to start the run afresh")
        return None
    finally:
        store.close()


def find_checkpoint(source: str | Path) -> tuple[Path, int]:
    """(checkpoints folder, step) from a run folder, its checkpoints folder, or one step's folder."""
    source = Path(source).absolute()
    for directory in (source / "checkpoints", source):
        if directory.is_dir():
            steps = sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
            if steps:
                return directory, steps[-1]
    if source.name.isdigit() and source.parent.is_dir():
        return source.parent, int(source.name)
    raise FileNotFoundError(f"no checkpoint found in {source} (expected a run folder, its checkpoints/ "
                            "folder or a checkpoints/<step> folder)")

