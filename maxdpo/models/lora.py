"""LoRA adapters on linear weights, as PEFT defines them: y = x W + scale * (x A) B, A [in, r], B [r, out].

PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)), B = 0, so a new adapter leaves
the model unchanged; scale = alpha / r, or alpha / sqrt(r) with rsLoRA. Targets are regexes over Hugging Face
tensor names (as `freeze.*`, so laser_snr.py's layer patterns serve: they also match norms, which are
skipped); a parameter whose layers match only in part carries adapters in every layer of its stack, trained
only in the matching ones (the others keep B = 0, so they add nothing and export nothing). Adapters live
beside their weight: `q_proj` gets `q_proj_lora_a` / `q_proj_lora_b`, sharded along the weight's input /
output axes, unsharded along the rank. Mixtral's experts get one adapter per expert, gate and up sharing A
(`experts_gate_up_lora_a` [layers, experts, D, r], `experts_gate_up_lora_b` [layers, experts, r, 2, F]) as
PEFT adapts transformers' fused `gate_up_proj`, and `experts_down_lora_a` / `_b`.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from maxdpo.config import ConfigError, LoraConfig, compile_patterns
from maxdpo.models import nf4
from maxdpo.models.family import Family, ParamEntry
from maxdpo.models.spec import Architecture, LoraSpec

SUFFIXES = ("_lora_a", "_lora_b")
# The projections of the layers: adapters sit on them and `quantize: nf4` stores them (Mixtral's experts
# included; its router takes adapters but stays unquantised, as bitsandbytes leaves it).
PROJECTIONS = {("layers", "attn", name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    ("layers", "mlp", name) for name in ("gate_proj", "up_proj", "down_proj")}
ROUTER = ("layers", "mlp", "router")
# Mixtral's experts carry adapters as PEFT puts them on transformers' fused expert tensors: one per layer for
# all experts, gate and up sharing A (`gate_up_proj`), down its own; adapter path -> the weights it changes.
EXPERT_ADAPTERS = {"layers/mlp/experts_gate_up": ("layers/mlp/gate_proj", "layers/mlp/up_proj"),
                   "layers/mlp/experts_down": ("layers/mlp/down_proj",)}


def is_adapter(path: tuple[str, ...] | str) -> bool:
    name = path[-1] if isinstance(path, tuple) else path.rsplit("/", 1)[-1]
    return name.endswith(SUFFIXES)


def adapted_weights(adapter: str) -> tuple[str, ...]:
    """The weights ('a/b/c') the adapter at `adapter` adds to."""
    return EXPERT_ADAPTERS.get(adapter, (adapter,))


def _adapter_of(entry: ParamEntry) -> str:
    weight = "/".join(entry.path)
    return next((adapter for adapter, weights in EXPERT_ADAPTERS.items() if weight in weights), weight) \
        if "expert" in entry.indexed_axes else weight


def plan(spec: Architecture, family: Family, cfg: LoraConfig) -> Optional[LoraSpec]:
    """The adapters `cfg.targets` asks for and the layers where each trains; None when `lora.rank` is 0. A
    pattern that matches no adaptable weight, or that splits what PEFT adapts as one, is an error."""
    if not cfg.rank:
        return None
    patterns = compile_patterns(cfg.targets, "lora.targets")
    used, matched = set(), {}  # adapter -> {weight: [layers] bool}
    for entry in family.param_entries(spec):
        tensors = entry.tensors(spec)
        hits = [[p.pattern for p in patterns if p.search(name)] for _, name in tensors]
        if not any(hits) or entry.linear_in_ndim is None:  # norms and embeddings: no adapters, no complaint
            continue
        if entry.path not in PROJECTIONS | {ROUTER}:
            raise ConfigError(f"config key 'lora.targets' matches {tensors[0][1]}, which cannot carry an adapter "
                              "(supported: the attention and MLP projections, Mixtral's experts and router)")
        used.update(pattern for names in hits for pattern in names)
        per_tensor = np.array([bool(names) for names in hits]).reshape(spec.num_layers, -1)  # [layers, experts?]
        split = np.flatnonzero(per_tensor.any(1) & ~per_tensor.all(1))
        if split.size:
            raise ConfigError(f"config key 'lora.targets' matches some experts of layer {split[0]} "
                              f"({entry.hf_name}) but not all; PEFT adapts a layer's experts together")
        matched.setdefault(_adapter_of(entry), {})["/".join(entry.path)] = per_tensor[:, 0]
    for adapter, weights in EXPERT_ADAPTERS.items():
        masks = [matched[adapter].get(weight) for weight in weights] if adapter in matched else []
        if any(mask is None or not np.array_equal(mask, masks[0]) for mask in masks):
            raise ConfigError("config key 'lora.targets' matches Mixtral's expert w1 (gate) and w3 (up) in "
                              "different layers; PEFT adapts the two together (one gate_up_proj): match both")
    unused = [p.pattern for p in patterns if p.pattern not in used]
    if unused or not patterns:
        raise ConfigError(f"config key 'lora.targets': {unused or '[]'} match no adaptable weight of this "
                          f"{spec.family} model (patterns are searched in Hugging Face names such as "
                          f"'model.layers.0.self_attn.q_proj.weight')")
    scale = cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)
    trained = ((adapter, tuple(bool(x) for x in next(iter(masks.values())))) for adapter, masks in matched.items())
    return LoraSpec(cfg.rank, scale, tuple(sorted(trained)))


def make_adapters(rngs: nnx.Rngs, weight: nnx.Param, contract: int, rank: int, lead: int, shared_by: int = 1
                  ) -> tuple[nnx.Param, nnx.Param]:
    """(A [*lead, *in, r], B [*lead, r, *out]) for `weight` [*lead, *in, *out]: `lead` axes (layers, experts)
    each with its own adapter, then `contract` input axes. `shared_by` > 1: one A for that many weights of
    this shape, B [*lead, r, shared_by, *out] (Mixtral's gate and up)."""
    value, axes = weight.get_value(), weight.get_metadata()["logical_axes"]
    shape = value.shape
    in_shape, out_shape = shape[lead:lead + contract], shape[lead + contract:]
    shared = (shared_by,) if shared_by > 1 else ()
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(rngs.params(), (*shape[:lead], *in_shape, rank), value.dtype, -bound, bound)
    b = jnp.zeros((*shape[:lead], rank, *shared, *out_shape), value.dtype)
    return (nnx.Param(a, logical_axes=(*axes[:lead + contract], None)),
            nnx.Param(b, logical_axes=(*axes[:lead], None, *(None,) * len(shared), *axes[lead + contract:])))


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
