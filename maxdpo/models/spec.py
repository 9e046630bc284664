"""ModelSpec: the architecture of one decoder plus how to run it (dtypes, kernels, remat, scan)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

SLIDING, FULL = "sliding_attention", "full_attention"  # HF `layer_types` values
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None  # sorted (key, value) items, hashable
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    pad_token_id: Optional[int] = None
    hidden_act: str = "silu"
    # Mistral / Gemma-2: keys at most `sliding_window - 1` positions back; `layer_types` picks the layers
    # (None: every layer slides when a window is set).
    sliding_window: Optional[int] = None
    layer_types: Optional[tuple[str, ...]] = None
    # Gemma: RMSNorm scales by (1 + w), embeddings are multiplied by sqrt(hidden_size).
    norm_plus_one: bool = False
    scale_embeddings: bool = False
    # Gemma-2: attention scale query_pre_attn_scalar**-0.5, tanh soft-caps, norms after attention and MLP.
    query_pre_attn_scalar: Optional[float] = None
    attn_logit_softcap: Optional[float] = None
    final_logit_softcap: Optional[float] = None
    post_norms: bool = False
    # Mixtral: sparse MoE MLP when num_experts > 0.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.0
    # How to run it (not part of the checkpoint).
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "xla"
    moe_impl: str = "dense"
    remat: str = "none"
    scan_layers: bool = True
    shared_prefix: bool = False  # inputs in the prefix-sharing layout (data.prefix_sharing)
    logits_chunk: int = 512  # positions per vocabulary projection in the loss (0: all at once)

    ARCHITECTURE_FIELDS = (
        "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
        "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings",
        "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "sliding_window",
        "layer_types", "norm_plus_one", "scale_embeddings", "query_pre_attn_scalar", "attn_logit_softcap",
        "final_logit_softcap", "post_norms", "num_experts", "num_experts_per_tok", "router_aux_loss_coef",
    )

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            unknown = set(self.layer_types) - {SLIDING, FULL}
            if unknown:
                raise ValueError(f"unknown layer_types {sorted(unknown)}; expected '{SLIDING}' or '{FULL}'")
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types lists {len(self.layer_types)} layers but num_layers is {self.num_layers}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {list(ACTIVATIONS)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or null, got {self.sliding_window}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts "
                             f"({self.num_experts})]")

    def replace(self, **changes) -> "ModelSpec":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown model field(s) {sorted(unknown)}; valid: {list(self.ARCHITECTURE_FIELDS)}")
        return dataclasses.replace(self, **changes)

    def layer_windows(self) -> tuple[Optional[int], ...]:
        """Each layer's sliding window (None: full causal attention)."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_layers
        return tuple(self.sliding_window if kind == SLIDING else None for kind in self.layer_types)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attention = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * d * f if not self.num_experts else self.num_experts * (3 * d * f + d)
        norms = (4 if self.post_norms else 2) * d
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attention + mlp + norms) + embeddings + d
