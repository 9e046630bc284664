"""Model families on one shared decoder."""
from maxdpo.models.spec import ModelSpec
from maxdpo.models.transformer import Transformer

__all__ = ["ModelSpec", "Transformer"]
