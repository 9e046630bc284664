"""Mistral: the Llama decoder with sliding-window attention."""
from __future__ import annotations

from maxdpo.models.family import Family
from maxdpo.models.llama import decoder_hf_config, decoder_param_entries, decoder_spec_from_hf
from maxdpo.models.spec import Architecture

# mistralai/Mistral-7B-v0.1
MISTRAL_7B = Architecture(
    family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=32768, sliding_window=4096, bos_token_id=1, eos_token_id=2)


def mistral_spec_from_hf(config: dict) -> dict:
    return {**decoder_spec_from_hf(config), "sliding_window": config.get("sliding_window")}


def mistral_hf_config(spec: Architecture) -> dict:
    return {**decoder_hf_config(spec), "sliding_window": spec.sliding_window}


MISTRAL = Family(
    name="mistral", model_types=("mistral",), architecture="MistralForCausalLM", default_spec=MISTRAL_7B,
    param_entries=decoder_param_entries, spec_from_hf=mistral_spec_from_hf, hf_config=mistral_hf_config)
