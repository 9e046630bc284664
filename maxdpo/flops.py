"""Model FLOPs of a DPO step, counted from the model shape (the numerator of MFU).

Per token, one forward pass costs 2 x (the weights a token multiplies: attention projections, the MLP,
or for MoE the router and its top-k experts, and the vocabulary projection) plus the attention scores,
4 x heads x head_dim x (keys it sees: (T + 1) / 2 on average causally, fewer inside a window), summed
over layers. A DPO step runs the policy forward and backward (3 forward passes) on chosen and
rejected, and the reference forward (1 more) unless its log-probs are precomputed. Embedding lookups,
norms, softmax and the optimizer are not counted (the convention of MFU, after PaLM).
"""
from __future__ import annotations

from typing import Optional

from maxdpo.models.spec import Architecture


def mean_visible_keys(seq_len: int, window: Optional[int]) -> float:
    """Keys a query sees on average in a causal row of seq_len tokens (inside `window` when set)."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # queries 0..w-1 see i+1 keys, the rest see w
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def forward_flops_per_token(spec: Architecture, seq_len: int) -> float:
    d, f, h = spec.hidden_size, spec.intermediate_size, spec.head_dim
    projections = d * h * (2 * spec.num_heads + 2 * spec.num_kv_heads)
    mlp = 3 * d * f * (spec.num_experts_per_tok if spec.num_experts else 1) + d * spec.num_experts
    weights = spec.num_layers * (projections + mlp) + d * spec.vocab_size
    scores = sum(4 * spec.num_heads * h * mean_visible_keys(seq_len, window) for window in spec.layer_windows())
    return 2 * weights + scores


def dpo_step_flops(spec: Architecture, rows: int, seq_len: int, reference: bool = True) -> float:
    """FLOPs of one DPO step on `rows` pairs of chosen + rejected sequences of seq_len tokens."""
    passes = 3 + (1 if reference else 0)
    return passes * 2 * rows * seq_len * forward_flops_per_token(spec, seq_len)
