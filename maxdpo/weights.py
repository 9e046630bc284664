"""A run's weights on the mesh: the initial policy (HF folder or random init), the reference, host copies."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from maxdpo.checkpoint.hf import load_params_sharded, spec_from_pretrained
from maxdpo.config import ConfigError
from maxdpo.data.sources import resolve_path
from maxdpo.models.lora import adapters_off, merge_trees, quantize_base, split_adapters
from maxdpo.models.registry import get_family
from maxdpo.models.transformer import Transformer
from maxdpo.program import TrainProgram


def init_params(program: TrainProgram, seed: int, adapters_only: bool = False) -> dict:
    """Random init directly into its shards (never materialised whole on one device); `adapters_only`: just
    the LoRA adapters (the compiler drops the rest of the init)."""
    keep = split_adapters if adapters_only else (lambda tree: (None, tree))

    def create():
        params = nnx.to_pure_dict(nnx.state(Transformer(program.spec, nnx.Rngs(seed), program.execution), nnx.Param))
        return keep(params)[1]
    return jax.jit(create, out_shardings=keep(program.param_shardings)[1])()


def load_sharded(program: TrainProgram, path: str) -> dict:
    """HF weights, streamed from disk and placed tensor by tensor onto their shards (then quantised where the
    run stores its base in NF4)."""
    spec = program.spec
    params = load_params_sharded(resolve_path(path), spec, get_family(spec.family), program.stored_weight_shardings(),
                                 program.execution.param_dtype)
    if program.execution.quantize:
        base_shardings = split_adapters(program.param_shardings)[0]
        params = jax.jit(quantize_base, out_shardings=base_shardings, donate_argnums=0)(params)
    return params


def initial_params(program: TrainProgram) -> dict:
    """`model.path`'s weights (with freshly initialised LoRA adapters, when the run has them) or a random init."""
    cfg = program.cfg
    if not cfg.model.path:
        return init_params(program, cfg.run.seed)
    params = load_sharded(program, cfg.model.path)
    if program.execution.lora:
        params = merge_trees(params, init_params(program, cfg.run.seed, adapters_only=True))
    return params


def reference_params(program: TrainProgram, initial: dict, copy: bool = True) -> dict:
    """`reference.path`'s weights, or the initial policy (copied unless `copy` is false). The steps' reference
    model keeps them in its dtypes (`program.reference_weights`); the precompute pass reads them as they are."""
    if program.execution.lora:  # the base model: the same weights with the adapters off
        return adapters_off(initial)
    path = program.cfg.reference.path
    if path:
        if spec_from_pretrained(resolve_path(path))[1] != program.spec:
            raise ConfigError(f"reference.path {path} has a different architecture than the policy")
        initial, copy = load_sharded(program, path), False
    dtypes = lambda tree: [leaf.dtype for leaf in jax.tree.leaves(tree)]  # noqa: E731
    if program.reference_model and dtypes(program.abstract_reference) != dtypes(initial):
        return program.reference_weights(initial)
    return jax.tree.map(jnp.copy, initial) if copy else initial


def host_params(params: dict) -> dict:
    """Numpy copies of (possibly multi-process sharded) parameters; every process must call it."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, params)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
