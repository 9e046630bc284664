"""What a model family declares: its HF names, its default architecture, and its config translation."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from maxdpo.models.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """One parameter: our nested path, the HF tensor name (`{layer}` for stacked ones), and its layout.

    `linear_in_ndim` marks an HF Linear weight [out, in]: ours is its transpose reshaped to
    (*in_dims, *out_dims), the first `linear_in_ndim` axes (after `layers`) being the input.
    None means the HF tensor already has our per-layer shape.
    """
    path: tuple[str, ...]
    hf_name: str
    linear_in_ndim: Optional[int] = None

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.hf_name


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architecture: str  # the transformers class written into config.json
    default_spec: ModelSpec
    param_entries: Callable[[ModelSpec], list[ParamEntry]]
    spec_from_hf: Callable[[dict], dict]
    hf_config: Callable[[ModelSpec], dict]
