"""Whether a run folder's newest checkpoint continues this run: same training settings, same architecture."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from maxdpo.checkpoint.state import latest_meta
from maxdpo.config import Config, ConfigError, resume_free_keys, to_dict
from maxdpo.models.spec import Architecture


def _flat_config(content: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in content.items():
        if isinstance(value, dict) and not (prefix == "model." and key == "overrides"):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumable(cfg: Config, saved: dict, where: str) -> None:
    """Refuses to continue a run whose checkpoint was written under other training settings."""
    ours, theirs, free = _flat_config(to_dict(cfg)), _flat_config(saved), resume_free_keys()
    changed = [f"{key}: {theirs.get(key)!r} -> {ours.get(key)!r}" for key in sorted(set(ours) | set(theirs))
               if ours.get(key) != theirs.get(key) and not key.startswith(free)]
    if changed:
        raise ConfigError(f"{where} was written under a different config ({'; '.join(changed)}); resuming would not "
                          "continue the same run: restore those settings, choose another run.output_dir, or set "
                          "trainer.resume=never with a fresh folder")


def resume_point(cfg: Config, run_dir: Path) -> Optional[tuple[int, dict]]:
    """(step, meta) of the newest checkpoint in `run_dir` when the run continues from it, None for a fresh run."""
    newest = latest_meta(run_dir / "checkpoints")
    if newest is None:
        return None
    step, meta = newest
    where = f"checkpoint {run_dir / 'checkpoints' / str(step)}"
    if cfg.trainer.resume == "never":
        raise ConfigError(f"{run_dir} already holds checkpoints (newest step {step}) and trainer.resume is 'never'; "
                          "choose another run.output_dir or set trainer.resume=auto")
    check_resumable(cfg, meta["config"], where)
    return step, meta


def check_architecture(meta: dict, spec: Architecture, where: str) -> None:
    """The checkpoint's parameters must be those of `spec` (its model folder may have changed under it)."""
    try:
        saved = Architecture.from_dict(meta["model"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: its model architecture cannot be read ({err})") from err
    if saved != spec:
        changed = [f"{key}: {value!r} -> {getattr(spec, key)!r}" for key, value in vars(saved).items()
                   if getattr(spec, key) != value]
        raise ConfigError(f"{where} holds a different model architecture ({'; '.join(changed)})")
