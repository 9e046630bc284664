"""Orbax training checkpoints: `checkpoints/<step>/{params, opt_state, meta}`.

Orbax writes each step into a temporary folder and renames it when complete, so a crash mid-save never
leaves a half checkpoint that resume would pick; an existing step is never written over.
`meta` (JSON) carries the step, the model architecture and the resolved config, so a checkpoint alone is
enough to export it.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from maxdpo.checkpoint.safetensors_io import CheckpointError


class _BackgroundSaveErrors(logging.Filter):
    """Drops the tracebacks of a failed background write that Orbax (logger absl) and its abandoned write tasks
    (logger asyncio) log: the store raises that error itself, as one CheckpointError, at the next save or
    wait."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = "orbax" in record.pathname or "orbax" in record.getMessage()
        return not (record.levelno >= logging.ERROR and record.exc_info and from_orbax)


def _late_callback(unraisable) -> bool:
    """After a background write fails, Orbax closes its event loop while TensorStore still completes the other
    writes of that save; each completion's callback into the closed loop is reported as unraisable."""
    return isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"


def _install_filters() -> None:
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    if any(isinstance(f, _BackgroundSaveErrors) for f in loggers[0].filters):
        return
    for logger in loggers:
        logger.addFilter(_BackgroundSaveErrors())
    report = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None if _late_callback(unraisable) else report(unraisable)


def _reason(err: Exception) -> str:
    """The cause of a storage error in a few words: the OS's reason where the message carries one."""
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    os_reason = re.search(r": ([^:]*\[os_error_code='\d+'\])", first_line)
    return os_reason.group(1) if os_reason else first_line[:300]


class CheckpointStore:
    """Saves and restores training state under `<run>/checkpoints`. A save that fails (a full disk, a folder
    that became unwritable), in the foreground or in Orbax's background writer, raises one CheckpointError at
    that save or the next save/wait; the partial step stays an `<step>.orbax-checkpoint-tmp` folder that
    resume ignores."""

    def __init__(self, directory: str | Path, keep: int = 3):
        _install_filters()
        self.closed = False
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep if keep > 0 else None, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta", "reference"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, step: int, params: Any, opt_state: Any, meta: dict, reference: Any = None) -> None:
        """`reference`: the reference weights of a run whose reference moves (TR-DPO), else None."""
        if step in self.manager.all_steps():
            raise FileExistsError(f"checkpoint for step {step} already exists in {self.directory}; not overwriting")
        items = dict(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                     meta=ocp.args.JsonSave({**meta, "step": step}))
        if reference is not None:
            items["reference"] = ocp.args.StandardSave(reference)
        with self._storage_errors():
            self.manager.save(step, args=ocp.args.Composite(**items))

    def wait(self) -> None:
        with self._storage_errors():
            self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _storage_errors(self):
        try:
            yield
        except (OSError, ValueError, RuntimeError) as err:
            self._shut_down()  # stop the background writers before the error is reported
            intact = step_folders(self.directory)
            kept = f"the complete checkpoints there (steps {intact}) are intact" if intact else "none was complete"
            raise CheckpointError(f"could not write a checkpoint in {self.directory}: {_reason(err)}; {kept}") from err

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any = None,
                abstract_reference: Any = None) -> dict:
        """Restores params (and opt_state, and a moving reference, when their abstract trees are given) with
        their shardings."""
        items = {"params": ocp.args.StandardRestore(abstract_params)}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        if abstract_reference is not None:
            items["reference"] = ocp.args.StandardRestore(abstract_reference)
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
        """Waits for the save in flight and stops the background writers."""
        if self.closed:
            return
        try:
            self.wait()
        finally:
            self._shut_down()

    def _shut_down(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self.manager.close()


def step_folders(directory: Path) -> list[int]:
    """The steps of the complete checkpoints in `directory` (Orbax renames `<step>` into place when done)."""
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


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
            steps = step_folders(directory)
            if steps:
                return directory, steps[-1]
    if source.name.isdigit() and source.parent.is_dir():
        return source.parent, int(source.name)
    raise FileNotFoundError(f"no checkpoint found in {source} (expected a run folder, its checkpoints/ "
                            "folder or a checkpoints/<step> folder)")

