"""What a model family declares: its HF names, its default architecture, and its config translation."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Optional

from maxdpo.models.spec import Architecture


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """One parameter: our nested path, the HF tensor name, and its layout.

    `{layer}` and `{expert}` in `hf_name` index leading axes of our array (layers first): one HF tensor
    per layer (and per expert). `linear_in_ndim` marks an HF Linear weight [out, in]: ours is its
    transpose reshaped to (*in_dims, *out_dims), the first `linear_in_ndim` axes (after the indexed ones)
    being the input. None means the HF tensor already has our per-tensor shape.
    """
    path: tuple[str, ...]
    hf_name: str
    linear_in_ndim: Optional[int] = None

    @property
    def indexed_axes(self) -> tuple[str, ...]:
        return tuple(name for name in ("layer", "expert") if "{" + name + "}" in self.hf_name)

    def tensors(self, spec: Architecture) -> list[tuple[tuple[int, ...], str]]:
        """(index into our array, HF tensor name) for every HF tensor of this parameter."""
        sizes = {"layer": spec.num_layers, "expert": spec.num_experts}
        axes = self.indexed_axes
        return [(index, self.hf_name.format(**dict(zip(axes, index))))
                for index in itertools.product(*(range(sizes[axis]) for axis in axes))]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architecture: str  # the transformers class written into config.json
    default_spec: Architecture
    param_entries: Callable[[Architecture], list[ParamEntry]]
    spec_from_hf: Callable[[dict], dict]
    hf_config: Callable[[Architecture], dict]
    # For random init: the layer pattern for a depth set by `model.overrides` (Gemma-2 alternates).
    default_layer_types: Optional[Callable[[int], tuple[str, ...]]] = None
