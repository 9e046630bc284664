"""What a decoder is (`Architecture`: what config.json says) and how a run executes it (`Execution`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

SLIDING, FULL = "sliding_attention", "full_attention"  # HF `layer_types` values
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


@dataclasses.dataclass(frozen=True)
class Architecture:
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

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The fields `model.overrides` may set (every one but the family)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "family")

    def replace(self, **changes) -> "Architecture":
        unknown = set(changes) - set(self.field_names())
        if unknown:
            raise ValueError(f"unknown model field(s) {sorted(unknown)}; valid: {list(self.field_names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready fields (checkpoint meta); `from_dict` inverts it."""
        fields = dataclasses.asdict(self)
        fields["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        fields["layer_types"] = list(self.layer_types) if self.layer_types else None
        return fields

    @classmethod
    def from_dict(cls, fields: dict) -> "Architecture":
        return cls(**fields)

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


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (`maxdpo.models.lora`): rank, scale, and each adapter ('layers/attn/q_proj', or Mixtral's
    'layers/mlp/experts_gate_up') with the layers where it trains."""
    rank: int
    scale: float
    trained_layers: tuple[tuple[str, tuple[bool, ...]], ...]

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(path for path, _ in self.trained_layers)

    def adapts(self, path: str) -> bool:
        return path in self.adapters

    def layers(self, path: str) -> np.ndarray:
        """[layers] bool: where the adapter at `path` trains (elsewhere its B stays 0)."""
        return np.array(dict(self.trained_layers)[path])


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a run executes an architecture (not part of the checkpoint): dtypes, kernels, remat, scan."""
    dtype: Any = jnp.float32  # compute
    param_dtype: Any = jnp.float32
    attention: str = "xla"  # a key of maxdpo.kernels.ATTENTION_IMPLEMENTATIONS
    moe_impl: str = "dense"  # a key of maxdpo.models.moe.EXPERT_IMPLEMENTATIONS
    remat: str = "none"  # a key of maxdpo.models.transformer.REMAT_POLICIES, or none
    scan_layers: bool = True
    logits_chunk: int = 512  # positions per vocabulary projection in the loss (0: all at once)
    lora: Optional[LoraSpec] = None  # adapters on some weights; the rest of the model is frozen
    quantize: Optional[str] = None  # "nf4": the layers' projection weights stored 4-bit (QLoRA; frozen)
