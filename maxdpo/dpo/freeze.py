"""Partial freezing: `freeze.trainable` / `freeze.frozen` regexes over Hugging Face tensor names.

A tensor trains when it matches a `trainable` pattern (or the list is empty) and no `frozen` pattern
(`re.search`, e.g. `model\\.layers\\.(1[0-9])\\.mlp`). Our parameters stack layers (and experts) into
one array, so a parameter is fully trainable, fully frozen, or trainable in some of its layers/experts.
Fully frozen parameters get neither gradients nor optimizer state; a partly frozen one keeps state for
the whole array, and its frozen slices receive zero updates (no weight decay either).
"""
from __future__ import annotations

import dataclasses
from typing import Union

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from maxdpo.config import ConfigError, FreezeConfig, compile_patterns
from maxdpo.models.family import Family
from maxdpo.models.spec import Architecture, LoraSpec

SEPARATOR = "/"
Mask = Union[bool, np.ndarray]  # True: all trainable, False: frozen, array: per (layer, expert) slice


@dataclasses.dataclass(frozen=True)
class TrainableSplit:
    """Which slices of each parameter (flat key 'a/b/c') train; splits and merges parameter trees."""
    masks: dict[str, Mask]

    @property
    def freezes_anything(self) -> bool:
        return any(mask is not True for mask in self.masks.values())

    def trainable(self, params: dict) -> dict:
        """Flat {key: array} of the parameters with something to train."""
        flat = traverse_util.flatten_dict(params, sep=SEPARATOR)
        return {key: value for key, value in flat.items() if self.masks[key] is not False}

    def frozen(self, params: dict) -> dict:
        flat = traverse_util.flatten_dict(params, sep=SEPARATOR)
        return {key: value for key, value in flat.items() if self.masks[key] is False}

    @staticmethod
    def merge(trainable: dict, frozen: dict) -> dict:
        return traverse_util.unflatten_dict({**trainable, **frozen}, sep=SEPARATOR)

    def zero_frozen_slices(self, tree: dict) -> dict:
        """Gradients or updates of the trainable dict, zero on the frozen slices of partly frozen parameters."""
        def apply(key, value):
            mask = self.masks[key]
            if mask is True:
                return value
            mask = mask.reshape(mask.shape + (1,) * (value.ndim - mask.ndim))
            return jnp.where(mask, value, jnp.zeros_like(value))
        return {key: apply(key, value) for key, value in tree.items()}

    def summary(self, params: dict) -> str:
        flat = traverse_util.flatten_dict(params, sep=SEPARATOR)
        total = sum(v.size for v in flat.values())
        trainable = sum(v.size if self.masks[k] is True else 0 if self.masks[k] is False
                        else v.size // self.masks[k].size * int(self.masks[k].sum()) for k, v in flat.items())
        return f"{trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters trainable"


def trainable_split(spec: Architecture, family: Family, cfg: FreezeConfig) -> TrainableSplit:
    """Masks from the config's patterns; a pattern that matches no tensor of this model is an error."""
    trainable = compile_patterns(cfg.trainable, "freeze.trainable")
    frozen = compile_patterns(cfg.frozen, "freeze.frozen")
    used: set[str] = set()

    def trains(name: str) -> bool:
        hits_trainable = [p.pattern for p in trainable if p.search(name)]
        hits_frozen = [p.pattern for p in frozen if p.search(name)]
        used.update(hits_trainable, hits_frozen)
        return (not trainable or bool(hits_trainable)) and not hits_frozen

    masks: dict[str, Mask] = {}
    for entry in family.param_entries(spec):
        tensors = entry.tensors(spec)
        sizes = tuple(max(i) + 1 for i in zip(*(index for index, _ in tensors))) if entry.indexed_axes else ()
        mask = np.zeros(sizes, bool)
        for index, name in tensors:
            mask[index] = trains(name)
        masks[SEPARATOR.join(entry.path)] = True if mask.all() else False if not mask.any() else mask
    for key, patterns in (("freeze.trainable", trainable), ("freeze.frozen", frozen)):
        unused = [p.pattern for p in patterns if p.pattern not in used]
        if unused:
            raise ConfigError(f"config key '{key}': {unused} match no tensor of this {spec.family} model "
                              f"(patterns are searched in Hugging Face names such as "
                              f"'{family.param_entries(spec)[0].tensors(spec)[0][1]}')")
    if not any(mask is not False for mask in masks.values()):
        raise ConfigError("freeze.trainable / freeze.frozen leave no parameter to train")
    return TrainableSplit(masks)


def adapter_split(params: dict, lora: LoraSpec) -> TrainableSplit:
    """LoRA (`maxdpo.models.lora.plan`): every weight of `params` (a tree of the model's parameters, abstract or
    not) frozen; each adapter trains in the layers its targets match."""
    masks: dict[str, Mask] = {key: False for key in traverse_util.flatten_dict(params, sep=SEPARATOR)}
    for adapter in lora.adapters:
        layers = lora.layers(adapter)
        masks[adapter + "_lora_a"] = masks[adapter + "_lora_b"] = True if layers.all() else layers
    return TrainableSplit(masks)
