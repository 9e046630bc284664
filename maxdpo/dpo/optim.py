"""optax AdamW with Hugging Face's schedules, decay mask and gradient clipping."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from maxdpo.config import OptimizerConfig
from maxdpo.dpo import low_precision
from maxdpo.models.layers import is_norm_scale


def warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
    """`warmup_steps` when set, else ceil(warmup_ratio * total) as transformers computes it."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


# `optimizer.schedule`: (peak learning rate, steps after warmup) -> the schedule after warmup.
DECAYS = {
    "linear": lambda peak, steps: optax.linear_schedule(peak, 0.0, steps),
    "cosine": optax.cosine_decay_schedule,
    "constant": lambda peak, steps: optax.constant_schedule(peak),
}


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then linear/cosine decay to 0 at `total_steps`, or constant."""
    warmup = min(warmup_steps(cfg, total_steps), total_steps)
    decay = DECAYS[cfg.schedule](cfg.learning_rate, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def decay_mask(params) -> dict:
    """Weight decay on matrices only: norm scales are excluded, as transformers' Trainer does."""
    return jax.tree_util.tree_map_with_path(lambda path, _: not is_norm_scale(path), params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int,
                   param_dtype=jnp.float32) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Clipping + AdamW. fp32 parameters with fp32 moments run optax.adamw; any bf16 state runs the same
    arithmetic in fp32 with bf16 storage stochastically rounded (`low_precision`)."""
    schedule = make_schedule(cfg, total_steps)
    clip = optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity()
    if jnp.dtype(param_dtype) == jnp.float32 and jnp.dtype(cfg.moment_dtype) == jnp.float32:
        adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                            mask=decay_mask)
    else:
        adamw = optax.chain(low_precision.scale_by_adam(cfg.b1, cfg.b2, cfg.eps, cfg.moment_dtype),
                            optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                            optax.scale_by_learning_rate(schedule))
    return optax.chain(clip, adamw), schedule


def optimizer_state_shardings(optimizer: optax.GradientTransformation, trainable: dict, shardings: dict,
                              scalar_sharding) -> dict:
    """Shardings of `optimizer.init(trainable)`: every moment like the parameter it follows, counters
    `scalar_sharding`. Left to XLA, the zero-filled moments depend on no input and come out replicated."""
    abstract = jax.eval_shape(optimizer.init, trainable)
    return optax.tree_utils.tree_map_params(optimizer, lambda _, sharding: sharding, abstract, shardings,
                                            transform_non_params=lambda _: scalar_sharding)
