"""Llama (2/3/3.1): RMSNorm, GQA, SwiGLU, rotary with optional `llama3` scaling. The shared decoder as is."""
from __future__ import annotations

from maxdpo.models.family import Family, ParamEntry
from maxdpo.models.spec import Architecture

# Meta-Llama-3-8B; random init starts here and `model.overrides` changes any field.
LLAMA3_8B = Architecture(
    family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)


LAYER = "model.layers.{layer}"


GATED_MLP_ENTRIES = [ParamEntry(("layers", "mlp", "gate_proj"), f"{LAYER}.mlp.gate_proj.weight", 1),
                     ParamEntry(("layers", "mlp", "up_proj"), f"{LAYER}.mlp.up_proj.weight", 1),
                     ParamEntry(("layers", "mlp", "down_proj"), f"{LAYER}.mlp.down_proj.weight", 1)]


def decoder_param_entries(spec: Architecture, mlp_entries: list[ParamEntry] | None = None) -> list[ParamEntry]:
    """The Llama naming that Mistral, Mixtral and Gemma share; `mlp_entries` replaces the dense MLP."""
    entries = [
        ParamEntry(("embed",), "model.embed_tokens.weight"),
        ParamEntry(("layers", "attn_norm", "scale"), f"{LAYER}.input_layernorm.weight"),
        ParamEntry(("layers", "attn", "q_proj"), f"{LAYER}.self_attn.q_proj.weight", 1),
        ParamEntry(("layers", "attn", "k_proj"), f"{LAYER}.self_attn.k_proj.weight", 1),
        ParamEntry(("layers", "attn", "v_proj"), f"{LAYER}.self_attn.v_proj.weight", 1),
        ParamEntry(("layers", "attn", "o_proj"), f"{LAYER}.self_attn.o_proj.weight", 2),
        ParamEntry(("layers", "mlp_norm", "scale"), f"{LAYER}.post_attention_layernorm.weight"),
        *(GATED_MLP_ENTRIES if mlp_entries is None else mlp_entries),
        ParamEntry(("final_norm", "scale"), "model.norm.weight"),
    ]
    if not spec.tie_word_embeddings:
        entries.append(ParamEntry(("lm_head",), "lm_head.weight", 1))
    return entries


def read_rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from either spelling: `rope_theta`/`rope_scaling` or `rope_parameters`."""
    params = config.get("rope_parameters")
    if params:
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = dict(config.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return float(theta), scaling


def decoder_spec_from_hf(config: dict) -> dict:
    heads = config["num_attention_heads"]
    theta, scaling = read_rope(config)
    return dict(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=config.get("max_position_embeddings", 8192),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        initializer_range=config.get("initializer_range", 0.02), bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"), pad_token_id=config.get("pad_token_id"),
        hidden_act=config.get("hidden_act") or "silu")


def decoder_hf_config(spec: Architecture) -> dict:
    """Writes both rope spellings so older and newer transformers read the same rotary setup."""
    scaling = dict(spec.rope_scaling) if spec.rope_scaling else None
    return {
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim, "rms_norm_eps": spec.rms_norm_eps, "rope_theta": spec.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": spec.rope_theta},
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tie_word_embeddings, "initializer_range": spec.initializer_range,
        "bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id, "pad_token_id": spec.pad_token_id,
        "hidden_act": spec.hidden_act,
    }


def llama_hf_config(spec: Architecture) -> dict:
    return {**decoder_hf_config(spec), "attention_bias": False, "mlp_bias": False}


LLAMA = Family(
    name="llama", model_types=("llama",), architecture="LlamaForCausalLM", default_spec=LLAMA3_8B,
    param_entries=decoder_param_entries, spec_from_hf=decoder_spec_from_hf, hf_config=llama_hf_config)
