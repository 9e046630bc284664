"""Gemma (GeGLU, (1 + w) RMSNorm, sqrt(hidden)-scaled tied embeddings) and Gemma-2 (adds alternating
sliding/global layers, attention and final logit soft-caps, query_pre_attn_scalar, post-branch norms)."""
from __future__ import annotations

from maxdpo.models.family import Family, ParamEntry
from maxdpo.models.llama import LAYER, decoder_hf_config, decoder_param_entries, decoder_spec_from_hf
from maxdpo.models.spec import FULL, SLIDING, Architecture

GEMMA_TRAITS = dict(hidden_act="gelu_pytorch_tanh", norm_plus_one=True, scale_embeddings=True,
                    tie_word_embeddings=True)

# google/gemma-7b
GEMMA_7B = Architecture(
    family="gemma", vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_layers=28,
    num_heads=16, num_kv_heads=16, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=8192, bos_token_id=2, eos_token_id=1, pad_token_id=0, **GEMMA_TRAITS)


def alternating_layer_types(num_layers: int) -> tuple[str, ...]:
    """Gemma-2's default: sliding, global, sliding, global, ..."""
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


# google/gemma-2-9b
GEMMA2_9B = Architecture(
    family="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_layers=42,
    num_heads=16, num_kv_heads=8, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=8192, bos_token_id=2, eos_token_id=1, pad_token_id=0, sliding_window=4096,
    layer_types=alternating_layer_types(42), query_pre_attn_scalar=256, attn_logit_softcap=50.0,
    final_logit_softcap=30.0, post_norms=True, **GEMMA_TRAITS)


def gemma_activation(config: dict) -> str:
    """Legacy Gemma configs say `gelu` but mean the tanh approximation (as transformers reads them)."""
    activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    return "gelu_pytorch_tanh" if activation == "gelu" else activation


def gemma_spec_from_hf(config: dict) -> dict:
    return {**decoder_spec_from_hf(config), **GEMMA_TRAITS, "hidden_act": gemma_activation(config),
            "tie_word_embeddings": config.get("tie_word_embeddings", True)}


def gemma_hf_config(spec: Architecture) -> dict:
    return {**decoder_hf_config(spec), "hidden_activation": spec.hidden_act, "attention_bias": False}


def gemma2_param_entries(spec: Architecture) -> list[ParamEntry]:
    """Gemma-2 names the norm after attention `post_attention_layernorm`, the one before the MLP
    `pre_feedforward_layernorm`."""
    entries = [entry for entry in decoder_param_entries(spec) if entry.path[1:2] != ("mlp_norm",)]
    return entries + [
        ParamEntry(("layers", "post_attn_norm", "scale"), f"{LAYER}.post_attention_layernorm.weight"),
        ParamEntry(("layers", "mlp_norm", "scale"), f"{LAYER}.pre_feedforward_layernorm.weight"),
        ParamEntry(("layers", "post_mlp_norm", "scale"), f"{LAYER}.post_feedforward_layernorm.weight"),
    ]


def gemma2_spec_from_hf(config: dict) -> dict:
    num_layers = config["num_hidden_layers"]
    return {**gemma_spec_from_hf(config), "sliding_window": config.get("sliding_window"),
            "layer_types": config.get("layer_types") or alternating_layer_types(num_layers),
            "query_pre_attn_scalar": config.get("query_pre_attn_scalar", 256),
            "attn_logit_softcap": config.get("attn_logit_softcapping"),
            "final_logit_softcap": config.get("final_logit_softcapping"), "post_norms": True}


def gemma2_hf_config(spec: Architecture) -> dict:
    return {**gemma_hf_config(spec), "sliding_window": spec.sliding_window,
            "layer_types": [FULL if window is None else SLIDING for window in spec.layer_windows()],
            "query_pre_attn_scalar": spec.query_pre_attn_scalar,
            "attn_logit_softcapping": spec.attn_logit_softcap, "final_logit_softcapping": spec.final_logit_softcap}


GEMMA = Family(
    name="gemma", model_types=("gemma",), architecture="GemmaForCausalLM", default_spec=GEMMA_7B,
    param_entries=decoder_param_entries, spec_from_hf=gemma_spec_from_hf, hf_config=gemma_hf_config)

GEMMA2 = Family(
    name="gemma2", model_types=("gemma2",), architecture="Gemma2ForCausalLM", default_spec=GEMMA2_9B,
    param_entries=gemma2_param_entries, spec_from_hf=gemma2_spec_from_hf, hf_config=gemma2_hf_config,
    default_layer_types=alternating_layer_types)
