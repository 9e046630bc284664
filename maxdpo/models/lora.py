"""LoRA adapters on linear weights, as PEFT defines them: y = x W + scale * (x A) B, A [in, r], B [r, out].

PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)), B = 0, so a new adapter leaves
the model unchanged; scale = alpha / r, or alpha / sqrt(r) with rsLoRA. Targets are regexes over Hugging Face
tensor names (as `freeze.*`, so laser_snr.py's layer patterns serve: they also match norms, which are
skipped); a parameter whose layers match only in part carries adapters in every layer
of its stack, trained only in the matching ones (the others keep B = 0, so they add nothing and export
nothing). Adapters live beside their weight: `q_proj` gets `q_proj_lora_a` / `q_proj_lora_b`, sharded along
the weight's input / output axes, unsharded along the rank.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from maxdpo.config import ConfigError, LoraConfig
from maxdpo.models import nf4
from maxdpo.models.family import Family, ParamEntry
from maxdpo.models.spec import Architecture, LoraSpec

SUFFIXES = ("_lora_a", "_lora_b")
# The projections of the layers: adapters sit on them (dense ones only: PEFT's usual targets) and `quantize:
# nf4` stores them (Mixtral's experts included).
PROJECTIONS = {("layers", "attn", name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    ("layers", "mlp", name) for name in ("gate_proj", "up_proj", "down_proj")}


def adapter_entries(entry: ParamEntry) -> tuple[ParamEntry, ParamEntry]:
    """A's and B's entries: PEFT's `<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r]."""
    module = entry.hf_name.removesuffix(".weight")
    *parent, name = entry.path
    return (ParamEntry((*parent, name + "_lora_a"), f"{module}.lora_A.weight", entry.linear_in_ndim),
            ParamEntry((*parent, name + "_lora_b"), f"{module}.lora_B.weight", 1))


def is_adapter(path: tuple[str, ...] | str) -> bool:
    name = path[-1] if isinstance(path, tuple) else path.rsplit("/", 1)[-1]
    return name.endswith(SUFFIXES)


def plan(spec: Architecture, family: Family, cfg: LoraConfig) -> tuple[Optional[LoraSpec], dict[str, np.ndarray]]:
    """(the adapters' spec, {weight path 'a/b/c': per-layer bool array of where they train}); (None, {}) when
    `lora.rank` is 0. A pattern that matches no adaptable weight is an error."""
    if not cfg.rank:
        return None, {}
    patterns = []
    for pattern in cfg.targets:
        try:
            patterns.append(re.compile(pattern))
        except re.error as err:
            raise ConfigError(f"config key 'lora.targets': {pattern!r} is not a valid regular expression "
                              f"({err})") from err
    used, layers = set(), {}
    for entry in family.param_entries(spec):
        tensors = entry.tensors(spec)
        hits = [[p.pattern for p in patterns if p.search(name)] for _, name in tensors]
        if not any(hits) or entry.linear_in_ndim is None:  # norms and embeddings: no adapters, no complaint
            continue
        if entry.path not in PROJECTIONS or entry.indexed_axes != ("layer",):
            raise ConfigError(f"config key 'lora.targets' matches {tensors[0][1]}, which cannot carry an adapter "
                              "here (supported: the attention and dense MLP projections)")
        used.update(pattern for names in hits for pattern in names)
        layers["/".join(entry.path)] = np.array([bool(names) for names in hits])
    unused = [p.pattern for p in patterns if p.pattern not in used]
    if unused or not patterns:
        raise ConfigError(f"config key 'lora.targets': {unused or '[]'} match no adaptable weight of this "
                          f"{spec.family} model (patterns are searched in Hugging Face names such as "
                          f"'model.layers.0.self_attn.q_proj.weight')")
    scale = cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)
    return LoraSpec(cfg.rank, scale, tuple(sorted(layers))), layers


def make_adapters(rngs: nnx.Rngs, weight: nnx.Param, contract: int, rank: int, stacked: bool
                  ) -> tuple[nnx.Param, nnx.Param]:
    """(A, B) for `weight` [layers?, *in, *out] whose first `contract` dims (after `layers`) are its input."""
    lead = 1 if stacked else 0
    value, axes = weight.get_value(), weight.get_metadata()["logical_axes"]
    shape = value.shape
    in_shape, out_shape = shape[lead:lead + contract], shape[lead + contract:]
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(rngs.params(), (*shape[:lead], *in_shape, rank), value.dtype, -bound, bound)
    b = jnp.zeros((*shape[:lead], rank, *out_shape), value.dtype)
    return (nnx.Param(a, logical_axes=(*axes[:lead + contract], None)),
            nnx.Param(b, logical_axes=(*axes[:lead], None, *axes[lead + contract:])))


def split_adapters(tree: dict) -> tuple[dict, dict]:
    """(the tree without adapters, the adapters alone), both nested like `tree`."""
    flat = traverse_util.flatten_dict(tree)
    parts = ({k: v for k, v in flat.items() if not is_adapter(k)}, {k: v for k, v in flat.items() if is_adapter(k)})
    return tuple(traverse_util.unflatten_dict(part) for part in parts)


def merge_trees(*trees: dict) -> dict:
    """Nested dicts with disjoint leaves -> one."""
    return traverse_util.unflatten_dict({k: v for tree in trees for k, v in traverse_util.flatten_dict(tree).items()})


def quantize_base(params: dict) -> dict:
    """An HF-loaded tree as the model stores it with `quantize: nf4`: each adaptable weight [layers, ...] replaced
    by `<name>_nf4` / `<name>_absmax` per layer (`maxdpo.models.nf4`); jit it with the quantised shardings."""
    flat = traverse_util.flatten_dict(params)
    for path in PROJECTIONS & set(flat):
        codes, absmax = jax.vmap(nf4.quantize)(flat.pop(path))
        *parent, name = path
        flat[(*parent, f"{name}_nf4")], flat[(*parent, f"{name}_absmax")] = codes, absmax
    return traverse_util.unflatten_dict(flat)


def dequantize_base(params: dict, shapes: dict) -> dict:
    """Host params with every NF4 weight restored (fp32) from its codes; `shapes`: the unquantised model's tree
    of ShapeDtypeStructs (`abstract_model(spec)[1]`)."""
    flat, stored = traverse_util.flatten_dict(params), traverse_util.flatten_dict(shapes)
    for path in PROJECTIONS & set(stored):
        *parent, name = path
        codes, absmax = (flat.pop((*parent, f"{name}_{part}"), None) for part in ("nf4", "absmax"))
        if codes is not None:
            layer_shape = stored[path].shape[1:]
            flat[path] = np.stack([np.asarray(nf4.dequantize(c, a, layer_shape, jnp.float32))
                                   for c, a in zip(codes, absmax)])
    return traverse_util.unflatten_dict(flat)


def adapters_off(params: dict) -> dict:
    """The same tree with every B zero: the base model's function, bitwise (x W + scale * (x A) 0 = x W)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if str(getattr(path[-1], "key", "")).endswith("_lora_b") else x, params)
