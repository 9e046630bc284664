"""`python -m maxdpo.export SRC OUT [--dtype bfloat16]`: a run folder or checkpoint -> Hugging Face folder.

SRC is a run folder (its newest checkpoint), its `checkpoints/` folder, or one `checkpoints/<step>`.
OUT gets config.json, safetensors shards, the tokenizer files (when the run's tokenizer is found) and a
model card (README.md) with the hyper-parameters and the evaluations logged up to the exported step.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import jax

from maxdpo.checkpoint.peft import save_model
from maxdpo.checkpoint.safetensors_io import CheckpointError
from maxdpo.checkpoint.state import CheckpointStore, find_checkpoint
from maxdpo.config import ConfigError
from maxdpo.configure import from_dict
from maxdpo.data.run_data import export_tokenizer
from maxdpo.export_folder import check_target, export_folder
from maxdpo.model_card import write_model_card
from maxdpo.models.spec import Architecture
from maxdpo.models.transformer import abstract_model
from maxdpo.program import execution_from_config

log = logging.getLogger("maxdpo")


def export_checkpoint(source: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    check_target(Path(out_dir).absolute())  # before any restoring
    directory, step = find_checkpoint(source)
    store = CheckpointStore(directory)
    try:
        meta = store.read_meta(step)
        cfg = from_dict(meta["config"])
        spec = Architecture.from_dict(meta["model"])
        _, abstract, _ = abstract_model(spec, execution_from_config(cfg, spec))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
        params = store.restore(step, target)["params"]
    finally:
        store.close()
    with export_folder(out_dir) as staging:
        if dtype:
            cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, dtype=dtype))
        save_model(spec, cfg, jax.tree.map(jax.device_get, params), staging)
        try:
            export_tokenizer(cfg, staging)
        except (ConfigError, OSError) as err:
            log.warning("tokenizer not exported: %s", err)
        write_model_card(staging, cfg, directory.parent / "metrics.jsonl", step, meta.get("mesh", {}),
                         meta.get("data_parallel", 1))
    log.info("exported step %d of %s to %s", step, directory, out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    parser = argparse.ArgumentParser(prog="python -m maxdpo.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run folder, checkpoints folder or checkpoints/<step>")
    parser.add_argument("out", help="output folder for the Hugging Face model")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    args = parser.parse_args(argv)
    try:
        export_checkpoint(args.source, args.out, args.dtype)
    except (FileNotFoundError, FileExistsError, CheckpointError, ConfigError) as err:
        print(f"maxdpo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
