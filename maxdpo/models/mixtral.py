"""Mixtral: Mistral with a sparse MoE MLP (softmax router, top-k experts, router load-balancing loss)."""
from __future__ import annotations

from maxdpo.models.family import Family, ParamEntry
from maxdpo.models.llama import LAYER, decoder_param_entries
from maxdpo.models.mistral import mistral_hf_config, mistral_spec_from_hf
from maxdpo.models.spec import Architecture

# mistralai/Mixtral-8x7B-v0.1
MIXTRAL_8X7B = Architecture(
    family="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6,
    max_position_embeddings=32768, num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
    bos_token_id=1, eos_token_id=2)


def mixtral_param_entries(spec: Architecture) -> list[ParamEntry]:
    """Per-expert `block_sparse_moe.experts.N.w1/w2/w3` tensors, as on the hub."""
    moe = f"{LAYER}.block_sparse_moe"
    return decoder_param_entries(spec, mlp_entries=[
        ParamEntry(("layers", "mlp", "router"), f"{moe}.gate.weight", 1),
        ParamEntry(("layers", "mlp", "gate_proj"), f"{moe}.experts.{{expert}}.w1.weight", 1),
        ParamEntry(("layers", "mlp", "up_proj"), f"{moe}.experts.{{expert}}.w3.weight", 1),
        ParamEntry(("layers", "mlp", "down_proj"), f"{moe}.experts.{{expert}}.w2.weight", 1),
    ])


def mixtral_spec_from_hf(config: dict) -> dict:
    return {**mistral_spec_from_hf(config), "num_experts": config["num_local_experts"],
            "num_experts_per_tok": config.get("num_experts_per_tok", 2),
            "router_aux_loss_coef": config.get("router_aux_loss_coef", 0.001)}


def mixtral_hf_config(spec: Architecture) -> dict:
    return {**mistral_hf_config(spec), "num_local_experts": spec.num_experts,
            "num_experts_per_tok": spec.num_experts_per_tok, "router_aux_loss_coef": spec.router_aux_loss_coef,
            "router_jitter_noise": 0.0, "output_router_logits": False}


MIXTRAL = Family(
    name="mixtral", model_types=("mixtral",), architecture="MixtralForCausalLM", default_spec=MIXTRAL_8X7B,
    param_entries=mixtral_param_entries, spec_from_hf=mixtral_spec_from_hf, hf_config=mixtral_hf_config)
