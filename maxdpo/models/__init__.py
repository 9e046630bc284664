"""Model families on one shared decoder."""
from maxdpo.models.spec import Architecture
from maxdpo.models.transformer import Transformer

__all__ = ["Architecture", "Transformer"]
