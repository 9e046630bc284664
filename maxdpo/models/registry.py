"""Family lookup by `model.family` or by an HF config's `model_type`."""
from __future__ import annotations

from maxdpo.models.family import Family
from maxdpo.models.gemma import GEMMA, GEMMA2
from maxdpo.models.llama import LLAMA
from maxdpo.models.mistral import MISTRAL
from maxdpo.models.mixtral import MIXTRAL

FAMILIES: dict[str, Family] = {family.name: family for family in (LLAMA, MISTRAL, MIXTRAL, GEMMA, GEMMA2)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_for_model_type(model_type: str, source: str = "config.json") -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"unsupported model_type {model_type!r} in {source}; supported: {supported}")
