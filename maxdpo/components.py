"""Builds what a run needs from its config: tokenizer, model spec, sharded parameters, tokenised data."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from transformers import AutoTokenizer

from maxdpo.checkpoint.hf import load_params_sharded, spec_from_pretrained, to_dtype
from maxdpo.config import Config, ConfigError
from maxdpo.data.loader import BatchPlan
from maxdpo.data.pipeline import PreparedData, prepare_pairs
from maxdpo.data.sources import resolve_path
from maxdpo.dpo.losses import LossHyper
from maxdpo.dpo.step import LossSettings
from maxdpo.models.registry import get_family
from maxdpo.models.spec import ModelSpec
from maxdpo.models.transformer import Transformer, abstract_model
from maxdpo.sharding import tree_shardings

log = logging.getLogger("maxdpo")


def runtime_options(cfg: Config) -> dict:
    return dict(dtype=to_dtype(cfg.model.dtype), param_dtype=to_dtype(cfg.model.param_dtype),
                attention=cfg.model.attention, moe_impl=cfg.model.moe_impl, remat=cfg.model.remat,
                scan_layers=cfg.model.scan_layers, shared_prefix=cfg.data.prefix_sharing,
                logits_chunk=cfg.model.logits_chunk)


def build_spec(cfg: Config) -> ModelSpec:
    """From `model.path`'s config.json, or the family's default architecture with `model.overrides`."""
    runtime = runtime_options(cfg)
    if cfg.model.path:
        family, spec = spec_from_pretrained(resolve_path(cfg.model.path), **runtime)
        if family.name != cfg.model.family:
            raise ConfigError(f"model.family is '{cfg.model.family}' but {cfg.model.path} holds a '{family.name}' model")
        if cfg.model.overrides:
            raise ConfigError("model.overrides applies to random init only; remove it or set model.path: null")
        return spec
    family = get_family(cfg.model.family)
    spec = dataclasses.replace(family.default_spec, **runtime)
    overrides = dict(cfg.model.overrides)
    unknown = set(overrides) - set(ModelSpec.ARCHITECTURE_FIELDS)
    if unknown:
        raise ConfigError(f"unknown key(s) in model.overrides: {sorted(unknown)}; valid: {list(ModelSpec.ARCHITECTURE_FIELDS)}")
    if family.default_layer_types and "layer_types" not in overrides:
        overrides["layer_types"] = family.default_layer_types(overrides.get("num_layers", spec.num_layers))
    try:
        return spec.replace(**overrides)
    except ValueError as err:
        raise ConfigError(f"model.overrides: {err}") from err


def loss_settings(cfg: Config) -> LossSettings:
    dpo = cfg.dpo
    return LossSettings(dpo.loss, LossHyper(dpo.beta, dpo.label_smoothing, dpo.dpop_lambda), dpo.sft_weight,
                        dpo.router_aux_coef)


def load_tokenizer(cfg: Config):
    source = cfg.tokenizer.path or cfg.model.path
    if not source:
        raise ConfigError("no tokenizer: set tokenizer.path (or model.path to a folder with tokenizer files)")
    path = resolve_path(source)
    if not Path(path).exists():
        raise ConfigError(f"tokenizer path not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def param_shardings(spec: ModelSpec, mesh: Mesh, rules: dict):
    graphdef, abstract, axes = abstract_model(spec)
    return graphdef, abstract, tree_shardings(abstract, axes, rules, mesh)


def init_params(spec: ModelSpec, shardings, seed: int) -> dict:
    """Random init directly into its shards (never materialised whole on one device)."""
    def create():
        return nnx.to_pure_dict(nnx.state(Transformer(spec, nnx.Rngs(seed)), nnx.Param))
    return jax.jit(create, out_shardings=shardings)()


def load_sharded_params(path: str, spec: ModelSpec, shardings) -> dict:
    """HF weights, streamed from disk and placed tensor by tensor onto their shards."""
    return load_params_sharded(resolve_path(path), spec, get_family(spec.family), shardings)


def copy_params(params: dict) -> dict:
    return jax.tree.map(jnp.copy, params)


def prepare_data(source: str, split: str, cfg: Config, tokenizer) -> PreparedData:
    """Tokenised pairs of a data source (cached on disk; progress shown by the first process)."""
    return prepare_pairs(source, split, cfg.data, tokenizer, sft=cfg.dpo.loss == "sft",
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


def check_vocab(spec: ModelSpec, tokenizer) -> None:
    if len(tokenizer) > spec.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {spec.vocab_size}")


def host_params(params: dict) -> dict:
    """Numpy copies of (possibly multi-process sharded) parameters; every process must call it."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, params)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
