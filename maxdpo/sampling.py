"""Sampling from a model with a KV cache: a batch of left-padded prompts is prefilled in one pass, then each
step feeds one token a row (greedy, or temperature with nucleus top-p) until every row has stopped (a stop
token, e.g. EOS or a chat template's end of turn) or `max_new_tokens` are out. One jitted function per
(settings, stop tokens, shapes); rows that stopped are padded, as transformers' `generate` pads them."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


# chat templates' end-of-turn tokens, which stop sampling besides EOS where the vocabulary has them
END_OF_TURN = ("<|eot_id|>", "<end_of_turn>", "<|im_end|>", "<|end|>")


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """EOS and the end-of-turn tokens of the tokenizer's vocabulary."""
    vocabulary = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] + [vocabulary[token] for token in END_OF_TURN if token in vocabulary]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus: sample among the most likely tokens whose probabilities sum to top_p

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs max_new_tokens >= 1, temperature >= 0 and top_p in (0, 1]; got {self}")


def left_padded(prompts: list[list[int]], pad_id: int, length: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, P], mask [B, P]) with each prompt right-aligned: every row's next token goes in one column; P is
    the longest prompt, or `length` when that is longer."""
    length = max(length, *(len(p) for p in prompts))
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = 1
    return ids, mask


def next_tokens(logits: jax.Array, settings: SamplingSettings, key: jax.Array) -> jax.Array:
    """[B, V] fp32 logits -> [B] tokens: the argmax (temperature 0), or a draw from softmax(logits / t) kept to
    the smallest set of most likely tokens whose probability reaches top_p."""
    if settings.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / settings.temperature
    if settings.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < settings.top_p, axis=-1, keepdims=True)  # [B, 1], at least 1
        threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def make_sampler(graphdef: nnx.GraphDef, settings: SamplingSettings, stop_ids: tuple[int, ...], pad_id: int,
                 out_sharding: Optional[jax.sharding.Sharding] = None) -> Callable:
    """sample(params, ids [B, P], mask [B, P], key) -> [B, max_new_tokens] new tokens (jitted), each row ending
    at its first stop token (kept) and padded after it; `out_sharding` (replicated over a mesh) lets every
    process read the tokens."""
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)

    def sample(params: dict, ids: jax.Array, mask: jax.Array, key: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        batch, prompt_length = ids.shape
        cache = model.empty_cache(batch, prompt_length + settings.max_new_tokens)
        logits, cache = model.decode(ids, jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0), mask, cache)
        tokens = jnp.full((batch, settings.max_new_tokens), pad_id, jnp.int32)
        state = (jnp.zeros((), jnp.int32), tokens, jnp.zeros((batch,), bool), logits, cache,
                 jnp.sum(mask, axis=-1).astype(jnp.int32), key)

        def running(state):
            step, _, done = state[:3]
            return (step < settings.max_new_tokens) & ~jnp.all(done)

        def one_token(state):
            step, tokens, done, logits, cache, positions, key = state
            key, draw = jax.random.split(key)
            token = jnp.where(done, pad_id, next_tokens(logits, settings, draw))  # [B]
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
            done = done | jnp.isin(token, stops)
            logits, cache = model.decode(token[:, None], positions[:, None], jnp.ones((batch, 1), jnp.int32), cache)
            return step + 1, tokens, done, logits, cache, positions + 1, key

        return jax.lax.while_loop(running, one_token, state)[1]

    return jax.jit(sample, out_shardings=out_sharding)


def completions(tokens: np.ndarray, stop_ids: tuple[int, ...]) -> list[list[int]]:
    """Each row's new tokens up to its first stop token (excluded)."""
    rows = []
    for row in np.asarray(tokens).tolist():
        end = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
        rows.append(row[:end])
    return rows
