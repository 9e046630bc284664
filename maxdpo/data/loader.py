"""Batches of preference pairs with grain: shuffled per epoch and seed, padded to a few bucket lengths.

A batch holds each pair's chosen row at [:, 0] and its rejected row at [:, 1]:
  input_ids        [B, 2, T] int32   prompt + completion, right-padded with pad_id
  segment_ids      [B, 2, T] int32   1 on real tokens, 0 on padding
  completion_mask  [B, 2, T] int32   1 on completion tokens (the tokens whose log-probs count)
  pair_mask        [B]       float32 1 for real pairs, 0 for the filler that completes a last eval batch
Step `i` of a run always reads batch `i`, which is what makes resume exact.
"""
from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np

from maxdpo.data.tokenize import TokenizedPair


def bucket_lengths(max_length: int, smallest: int = 16) -> list[int]:
    """Powers of two from `smallest` up to `max_length`, and `max_length` itself."""
    buckets, length = [], smallest
    while length < max_length:
        buckets.append(length)
        length *= 2
    return buckets + [max_length]


def collate(pairs: list[TokenizedPair], pad_id: int, buckets: list[int], batch_size: int) -> dict[str, np.ndarray]:
    longest = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    length = next(b for b in buckets if b >= longest)
    input_ids = np.full((batch_size, 2, length), pad_id, np.int32)
    segment_ids = np.zeros((batch_size, 2, length), np.int32)
    completion_mask = np.zeros((batch_size, 2, length), np.int32)
    pair_mask = np.zeros((batch_size,), np.float32)
    pair_mask[:len(pairs)] = 1.0
    for i, pair in enumerate(pairs):
        for side, (row, prompt_len) in enumerate(((pair.chosen, pair.chosen_prompt_len),
                                                  (pair.rejected, pair.rejected_prompt_len))):
            input_ids[i, side, :len(row)] = row
            segment_ids[i, side, :len(row)] = 1
            completion_mask[i, side, prompt_len:len(row)] = 1
    return {"input_ids": input_ids, "segment_ids": segment_ids, "completion_mask": completion_mask,
            "pair_mask": pair_mask}


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    batch_size: int  # global, in pairs
    epochs: int
    seed: int
    shuffle: bool
    pad_id: int
    max_length: int


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _collate_fn(plan: BatchPlan):
    buckets = bucket_lengths(plan.max_length)
    return lambda items: collate(list(items), plan.pad_id, buckets, plan.batch_size)


def batched_dataset(pairs: list[TokenizedPair], plan: BatchPlan) -> grain.MapDataset:
    """Random-access dataset of global batches, epoch after epoch (each epoch drops its last partial batch)."""
    if len(pairs) < plan.batch_size:
        raise ValueError(f"{len(pairs)} pairs cannot fill one batch of {plan.batch_size}")
    source = grain.MapDataset.source(pairs)
    epochs = []
    for epoch in range(plan.epochs):
        ordered = source.shuffle(seed=epoch_seed(plan.seed, epoch)) if plan.shuffle else source
        epochs.append(ordered.batch(plan.batch_size, drop_remainder=True, batch_fn=_collate_fn(plan)))
    return grain.MapDataset.concatenate(epochs)


def eval_dataset(pairs: list[TokenizedPair], plan: BatchPlan) -> grain.MapDataset:
    """Every pair once, in order; the last batch is completed with masked filler pairs."""
    return grain.MapDataset.source(pairs).batch(plan.batch_size, drop_remainder=False, batch_fn=_collate_fn(plan))


def process_slice(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's share of a global batch: a contiguous block of pairs."""
    count, index = jax.process_count(), jax.process_index()
    pairs = batch["input_ids"].shape[0]
    if pairs % count:
        raise ValueError(f"batch of {pairs} pairs does not split over {count} processes")
    share = pairs // count
    return {name: value[index * share:(index + 1) * share] for name, value in batch.items()}


def iterate_eval_batches(dataset: grain.MapDataset):
    yield from dataset.map(process_slice)


def iterate_batches(dataset: grain.MapDataset, start_step: int, num_steps: int, prefetch: int = 4):
    """Yields (step, this process's batch) for steps start_step .. num_steps-1, prefetched by grain."""
    remaining = dataset.slice(slice(start_step, num_steps)).map(process_slice)
    iterator = remaining.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    yield from enumerate(iterator, start=start_step)
