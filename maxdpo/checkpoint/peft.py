"""A run's export (`save_model`), and LoRA runs on disk the way Hugging Face tools read them: the merged model
(base + scale * A B, a plain HF folder) and a PEFT adapter folder (`adapter_config.json` +
`adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(base, folder)` loads onto the base model.

The adapter folder holds only the adapted layers; tensor names are PEFT's `base_model.model.<module>.lora_A.weight`
[r * experts, in] and `...lora_B.weight` [out, r * experts] (one expert: a Linear's adapter). Linear modules are
listed in `target_modules` (a regex of their exact names, so laser-style per-layer targets round-trip);
Mixtral's router and experts, parameters in transformers, in `target_parameters`.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterator

import numpy as np
from flax import traverse_util

from maxdpo.atomic import write_text
from maxdpo.checkpoint.hf import save_params
from maxdpo.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from maxdpo.config import Config, LoraConfig
from maxdpo.models.lora import EXPERT_ADAPTERS, adapted_weights, dequantize_base, is_adapter, plan
from maxdpo.models.registry import get_family
from maxdpo.models.spec import Architecture, LoraSpec
from maxdpo.models.transformer import abstract_model

ADAPTER_FOLDER = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# transformers >= 5 names Mixtral's sparse block `mlp` (hub checkpoints: `block_sparse_moe`), keeps its router as
# a parameter (`gate.weight`) and fuses each layer's experts (`experts.gate_up_proj` [E, 2F, D], gate rows first;
# `experts.down_proj` [E, D, F]); PEFT adapts these through `target_parameters`.
MOE_PARAMETERS = {"layers/mlp/router": "model.layers.{layer}.mlp.gate.weight",
                  "layers/mlp/experts_gate_up": "model.layers.{layer}.mlp.experts.gate_up_proj",
                  "layers/mlp/experts_down": "model.layers.{layer}.mlp.experts.down_proj"}


def merge_adapters(params: dict, lora: LoraSpec) -> dict:
    """Host params without adapters, each adapted weight replaced by W + scale * A B (computed in fp32, stored
    in W's dtype)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    merged = {key: value for key, value in flat.items() if not is_adapter(key)}
    for adapter in lora.adapters:
        a, b = (np.asarray(flat[adapter + suffix], np.float32) for suffix in ("_lora_a", "_lora_b"))
        weights = adapted_weights(adapter)
        lead = 2 if adapter in EXPERT_ADAPTERS else 1  # layers (and experts): one adapter each
        rank, count = a.shape[-1], math.prod(a.shape[:lead])
        for index, weight in enumerate(weights):
            b_of_weight = b[(slice(None),) * (lead + 1) + (index,)] if len(weights) > 1 else b  # [*lead, r, *out]
            delta = np.matmul(a.reshape(count, -1, rank), b_of_weight.reshape(count, rank, -1))  # [lead, in, out]
            base = np.asarray(merged[weight])
            merged[weight] = (base.astype(np.float32) + lora.scale * delta.reshape(base.shape)).astype(base.dtype)
    return traverse_util.unflatten_dict(merged, sep="/")


def save_model(spec: Architecture, cfg: Config, params: dict, out: Path) -> None:
    """The export of host `params` into `out`: the HF model, merged with the adapters of a LoRA run, whose PEFT
    adapter folder goes to `out/adapter`."""
    if not cfg.lora.rank:
        save_params(spec, params, out, cfg.export.dtype)
        return
    lora = plan(spec, get_family(spec.family), cfg.lora)
    if cfg.lora.quantize:  # the merged model adds the adapters to the NF4 base as the run computed with it
        params = dequantize_base(params, abstract_model(spec)[1])
    save_params(spec, merge_adapters(params, lora), out, cfg.export.dtype)
    save_adapter(spec, cfg.lora, params, out / ADAPTER_FOLDER, cfg.model.path or "")


def _peft_modules(spec: Architecture, lora: LoraSpec) -> Iterator[tuple[str, int, str]]:
    """(adapter, layer, PEFT module name) for every layer where an adapter trains."""
    entries = {"/".join(entry.path): entry for entry in get_family(spec.family).param_entries(spec)}
    for adapter in lora.adapters:
        for layer in np.flatnonzero(lora.layers(adapter)):
            if adapter in MOE_PARAMETERS:
                module = MOE_PARAMETERS[adapter].format(layer=layer).rpartition(".")[0]
                # PEFT wraps a module's targeted parameters in their order: gate_up inside down when both are
                if adapter == "layers/mlp/experts_gate_up" and lora.adapts("layers/mlp/experts_down") and \
                        lora.layers("layers/mlp/experts_down")[layer]:
                    module += ".base_layer"
            else:
                module = entries[adapter].hf_name.format(layer=layer).removesuffix(".weight")
            yield adapter, int(layer), module


def _experts(spec: Architecture, adapter: str) -> int:
    return spec.num_experts if adapter in EXPERT_ADAPTERS else 1


def _to_peft(a: np.ndarray, b: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer's (A [(E,) *in, r], B [(E,) r, *out]) -> PEFT's (lora_A [E * r, in] with rows (expert, rank),
    lora_B [out, r * E] with columns (rank, expert))."""
    rank = a.shape[-1]
    lora_a = a.reshape(experts, -1, rank).transpose(0, 2, 1).reshape(experts * rank, -1)
    lora_b = b.reshape(experts, rank, -1).transpose(2, 1, 0).reshape(-1, rank * experts)
    return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)


def _from_peft(lora_a: np.ndarray, lora_b: np.ndarray, experts: int, a_shape, b_shape
               ) -> tuple[np.ndarray, np.ndarray]:
    """`_to_peft`'s inverse into our per-layer shapes."""
    rank = a_shape[-1]
    a = lora_a.reshape(experts, rank, -1).transpose(0, 2, 1).reshape(a_shape)
    b = lora_b.reshape(-1, rank, experts).transpose(2, 1, 0).reshape(b_shape)
    return a, b


def save_adapter(spec: Architecture, cfg: LoraConfig, params: dict, out: Path, base_model: str) -> None:
    """Writes the PEFT adapter folder of host `params` into `out`."""
    lora = plan(spec, get_family(spec.family), cfg)
    flat = traverse_util.flatten_dict(params, sep="/")
    tensors, modules, parameters = [], set(), set()
    for adapter, layer, module in _peft_modules(spec, lora):
        pair = _to_peft(*(np.asarray(flat[adapter + suffix][layer]) for suffix in ("_lora_a", "_lora_b")),
                        _experts(spec, adapter))
        tensors += [(f"{PEFT_PREFIX}{module}.lora_{side}.weight", tensor) for side, tensor in zip("AB", pair)]
        if adapter in MOE_PARAMETERS:
            parameters.add(MOE_PARAMETERS[adapter].format(layer=layer))
        else:
            modules.add(module)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": cfg.rank,
        "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": "|".join(re.escape(module) for module in sorted(modules)) if modules else None,
        "target_parameters": sorted(parameters) or None,
    }
    write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2))


def read_adapter(folder: Path, spec: Architecture, cfg: LoraConfig, params: dict) -> dict:
    """`params` with the adapters of the PEFT folder (the layers it does not hold keep theirs)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    weights = SafetensorsFile(folder / ADAPTER_WEIGHTS)
    stored = set(weights.keys())
    arrays = {}
    for adapter, layer, module in _peft_modules(spec, plan(spec, get_family(spec.family), cfg)):
        names = [f"{PEFT_PREFIX}{module}.lora_{side}.weight" for side in "AB"]
        if not all(name in stored for name in names):
            continue
        a, b = (arrays.setdefault(key, np.array(flat[key])) for key in (adapter + "_lora_a", adapter + "_lora_b"))
        a[layer], b[layer] = _from_peft(*(weights.get(name) for name in names), _experts(spec, adapter),
                                        a.shape[1:], b.shape[1:])
    flat.update(arrays)
    return traverse_util.unflatten_dict(flat, sep="/")
