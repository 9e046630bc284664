"""Tiny random `transformers` models for parity tests (torch is a test-only dependency)."""
from __future__ import annotations

import torch
import transformers

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def tiny_llama(tmp_path, *, tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE, seed=0, **overrides):
    """Saves a random LlamaForCausalLM with odd shapes (head_dim != hidden/heads, vocab 97) and returns it."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    fields.update(overrides)
    rope = {"rope_theta": 500000.0, **(rope_scaling or {"rope_type": "default"})}
    config = transformers.LlamaConfig(**fields, rope_parameters=rope)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms so a missed scale shows up
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    return model


def hf_logits(model, input_ids, attention_mask=None):
    with torch.no_grad():
        ids = torch.tensor(input_ids, dtype=torch.long)
        mask = None if attention_mask is None else torch.tensor(attention_mask, dtype=torch.long)
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()
