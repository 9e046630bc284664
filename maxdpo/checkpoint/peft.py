"""A run's export (`save_model`), and LoRA runs on disk the way Hugging Face tools read them: the merged model
(base + scale * A B, a plain HF folder) and a PEFT adapter folder (`adapter_config.json` +
`adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(base, folder)` loads onto the base model.

The adapter folder holds only the adapted layers (`target_modules` is a regex of their exact module names, so
laser-style per-layer targets round-trip); tensor names are PEFT's `base_model.model.<module>.lora_A.weight`
[r, in] and `...lora_B.weight` [out, r].
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from flax import traverse_util

from maxdpo.atomic import write_text
from maxdpo.checkpoint.hf import _hf_to_ours, _ours_to_hf, save_params
from maxdpo.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from maxdpo.config import Config, LoraConfig
from maxdpo.models.family import Family
from maxdpo.models.lora import adapter_entries, dequantize_base, is_adapter, plan
from maxdpo.models.registry import get_family
from maxdpo.models.spec import Architecture, LoraSpec
from maxdpo.models.transformer import abstract_model

ADAPTER_FOLDER = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def merge_adapters(params: dict, lora: LoraSpec) -> dict:
    """Host params without adapters, each adapted weight replaced by W + scale * A B (computed in fp32, stored
    in W's dtype)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    merged = {key: value for key, value in flat.items() if not is_adapter(key)}
    for weight in lora.weights:
        base, a, b = (np.asarray(flat[weight + suffix]) for suffix in ("", "_lora_a", "_lora_b"))
        layers, rank = a.shape[0], a.shape[-1]
        delta = np.matmul(a.reshape(layers, -1, rank).astype(np.float32),
                          b.reshape(layers, rank, -1).astype(np.float32))  # [layers, in, out]
        merged[weight] = (base.astype(np.float32) + lora.scale * delta.reshape(base.shape)).astype(base.dtype)
    return traverse_util.unflatten_dict(merged, sep="/")


def save_model(spec: Architecture, cfg: Config, params: dict, out: Path) -> None:
    """The export of host `params` into `out`: the HF model, merged with the adapters of a LoRA run, whose PEFT
    adapter folder goes to `out/adapter`."""
    if not cfg.lora.rank:
        save_params(spec, params, out, cfg.export.dtype)
        return
    family = get_family(spec.family)
    lora, _ = plan(spec, family, cfg.lora)
    if cfg.lora.quantize:  # the merged model adds the adapters to the NF4 base as the run computed with it
        params = dequantize_base(params, abstract_model(spec)[1])
    save_params(spec, merge_adapters(params, lora), out, cfg.export.dtype)
    save_adapter(spec, family, cfg.lora, params, out / ADAPTER_FOLDER, cfg.model.path or "")


def _adapted(spec: Architecture, family: Family, cfg: LoraConfig):
    """(adapter entry, its weight's adapted layers) for A and B of every adapted weight."""
    _, layers = plan(spec, family, cfg)
    for entry in family.param_entries(spec):
        trained = layers.get("/".join(entry.path))
        if trained is not None:
            for adapter in adapter_entries(entry):
                yield adapter, trained


def save_adapter(spec: Architecture, family: Family, cfg: LoraConfig, params: dict, out: Path, base_model: str
                 ) -> None:
    """Writes the PEFT adapter folder of host `params` into `out`."""
    flat = traverse_util.flatten_dict(params, sep="/")
    tensors, modules = [], set()
    for entry, trained in _adapted(spec, family, cfg):
        array = np.asarray(flat["/".join(entry.path)])
        for (layer,), name in entry.tensors(spec):
            if trained[layer]:
                tensors.append((PEFT_PREFIX + name, _ours_to_hf(entry, array[layer])))
                modules.add(name.rsplit(".lora_", 1)[0])
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": cfg.rank,
        "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": "|".join(re.escape(module) for module in sorted(modules)),
    }
    write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2))


def read_adapter(folder: Path, spec: Architecture, family: Family, cfg: LoraConfig, params: dict) -> dict:
    """`params` with the adapters of the PEFT folder (the layers it does not hold keep theirs)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    weights = SafetensorsFile(folder / ADAPTER_WEIGHTS)
    stored = set(weights.keys())
    for entry, _ in _adapted(spec, family, cfg):
        key = "/".join(entry.path)
        array = np.array(flat[key])
        for (layer,), name in entry.tensors(spec):
            if PEFT_PREFIX + name in stored:
                array[layer] = _hf_to_ours(entry, weights.get(PEFT_PREFIX + name), array.shape[1:])
        flat[key] = array
    return traverse_util.unflatten_dict(flat, sep="/")
