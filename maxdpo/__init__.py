"""maxdpo: JAX-native preference optimisation (DPO, DPOP, ...) for open LLMs."""
__version__ = "0.1.0"

from maxdpo.checkpoint.hf import load_pretrained, save_pretrained  # noqa: E402

__all__ = ["__version__", "load_pretrained", "save_pretrained"]
