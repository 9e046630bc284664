"""Tiny random `transformers` models for parity tests (torch is a test-only dependency)."""
from __future__ import annotations

import torch
import transformers
from flax import nnx

import maxdpo

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# Odd shapes everywhere: head_dim != hidden / heads, vocab 97, 3 layers, windows shorter than the tests'
# sequences (40 tokens), soft-caps small enough to bend the logits.
COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(rms_norm_eps=1e-5, rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE})),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=7, rope_parameters={"rope_theta": 20000.0, "rope_type": "default"})),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=5, num_experts_per_tok=2, router_aux_loss_coef=0.02, sliding_window=11)),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM,
              dict(num_key_value_heads=1, head_dim=24, hidden_act="gelu_pytorch_tanh")),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(num_hidden_layers=4, head_dim=24, sliding_window=6, query_pre_attn_scalar=20,
                    attn_logit_softcapping=3.0, final_logit_softcapping=2.0, initializer_range=0.2)),
}


def tiny_hf(tmp_path, family: str, seed: int = 0, **overrides):
    """Saves a random `family` model with odd shapes to `tmp_path` and returns it (eager attention)."""
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    with torch.no_grad():  # non-trivial norms so a missed scale shows up
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    return model


def tiny_llama(tmp_path, *, tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE, seed=0, **overrides):
    rope = {"rope_theta": 500000.0, **(rope_scaling or {"rope_type": "default"})}
    return tiny_hf(tmp_path, "llama", seed, tie_word_embeddings=tie_word_embeddings, rope_parameters=rope,
                   **overrides)


def maxdpo_params(path):
    """(graphdef, pure parameter dict) of the HF folder `path` loaded by maxdpo."""
    graphdef, state = nnx.split(maxdpo.load_pretrained(path))
    return graphdef, nnx.to_pure_dict(state)


def hf_logits(model, input_ids, attention_mask=None):
    with torch.no_grad():
        ids = torch.tensor(input_ids, dtype=torch.long)
        mask = None if attention_mask is None else torch.tensor(attention_mask, dtype=torch.long)
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()
