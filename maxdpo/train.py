"""`python -m maxdpo.train [CONFIG.yaml] [key=value ...]`: a DPO run (default: the bundled tiny run)."""
from __future__ import annotations

import argparse
import logging
import sys

import jax
from absl import logging as absl_logging

from maxdpo.config import ConfigError, DEFAULT_CONFIG
from maxdpo.configure import load_config
from maxdpo.data.sources import DataError
from maxdpo.checkpoint.safetensors_io import CheckpointError
from maxdpo.distributed import maybe_initialize_distributed
from maxdpo.stages import run_stages
from maxdpo.run_lock import RunFolderInUse
from maxdpo.trainer import NonFiniteLossError, Preempted, run

# Errors of the input or the machine (a missing or unwritable path, a full disk): one line and exit status 2.
USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError, RunFolderInUse, OSError)


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m maxdpo.train", description=__doc__)
    parser.add_argument("config", nargs="?", help=f"YAML config (path or bundled name; default {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=10")
    args = parser.parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no config given, only overrides
        config, overrides = None, [config] + overrides
    return config, overrides


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("maxdpo").setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.WARNING)
    config, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(config, overrides)
        maybe_initialize_distributed()
        if cfg.stages:
            summary = run_stages(cfg, run, is_main=jax.process_index() == 0)
        else:
            summary = run(cfg)
    except USER_ERRORS as err:
        print(f"maxdpo: error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"maxdpo: {stop}", file=sys.stderr)
        return 128 + stop.signum
    final = {k: round(v, 4) for k, v in {**summary["train"], **summary["eval"]}.items() if isinstance(v, float)}
    print(f"maxdpo: finished {summary['steps']} steps in {summary['run_dir']}: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
