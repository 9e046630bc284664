"""Batches of preference pairs with grain: a schedule of global batches, each process materialising its share.

The schedule is computed from sequence lengths alone, identically on every process: per epoch the pairs
are shuffled (seeded by run seed and epoch), optionally packed several to a row, and cut into global
batches of `batch_size` rows (the last partial batch of an epoch is dropped; evaluation keeps it and
fills it with empty rows). Each batch is padded to the smallest bucket length (powers of two up to
max_length) that holds its longest row, so the jitted step compiles for a few shapes only, and every
process pads to the same length. Process p of P builds rows [p*R/P, (p+1)*R/P) of each batch.

A batch is a `batch.Batch` of this process's rows (`batch.collate` lays out the paired layout). Packing
puts a pair's chosen sequence in the chosen row and its rejected sequence in the rejected row, in the same
slot, so a pair is always (chosen slot k, rejected slot k) of one row. With `data.prefix_sharing` a pair
is one row `prompt | chosen | rejected` instead (prefix_sharing.py).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import grain
import numpy as np

from maxdpo.data.batch import Batch, collate, layout_of, longest_row
from maxdpo.data.prefix_sharing import collate_shared, sequence_tokens, shared_row_lengths
from maxdpo.data.sources import DataError
from maxdpo.data.store import PairStore

def bucket_lengths(max_length: int, smallest: int = 16) -> list[int]:
    """Powers of two from `smallest` up to `max_length`, and `max_length` itself."""
    buckets, length = [], smallest
    while length < max_length:
        buckets.append(length)
        length *= 2
    return buckets + [max_length]


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    batch_size: int  # global, in rows (one pair per row unless packing)
    epochs: int
    seed: int
    shuffle: bool
    pad_id: int
    max_length: int
    packing: bool = False
    prefix_sharing: bool = False  # one row per pair: prompt | chosen | rejected (prefix_sharing.py)

    @property
    def layout(self) -> str:
        return layout_of(self.prefix_sharing)

    @property
    def row_length(self) -> int:
        return longest_row(self.layout, self.max_length)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which pairs each global batch holds: rows[step, row, slot] = pair index, -1 for an empty slot."""
    rows: np.ndarray  # [steps, batch rows, pairs per row] int32
    lengths: np.ndarray  # [steps] padded length of each batch
    steps_per_epoch: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def epoch_at(self, step: int) -> float:
        """Epochs completed after `step` steps, fractional within the current epoch."""
        done = 0
        for epoch, count in enumerate(self.steps_per_epoch):
            if step <= done + count:
                return epoch + (step - done) / count
            done += count
        return float(len(self.steps_per_epoch))


def epoch_order(count: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count) if shuffle else np.arange(count)


def pack_rows(order: np.ndarray, lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """Next-fit packing in `order`: a row takes pairs while every side (chosen and rejected, or the one
    shared row) fits. lengths [N, sides]."""
    rows, current, used = [], [], np.zeros(lengths.shape[1], np.int64)
    for index in order:
        if current and np.any(used + lengths[index] > max_length):
            rows.append(current)
            current, used = [], np.zeros(lengths.shape[1], np.int64)
        current.append(int(index))
        used += lengths[index]
    return rows + ([current] if current else [])


def _to_slots(rows: list[list[int]], slots: int) -> np.ndarray:
    table = np.full((len(rows), slots), -1, np.int32)
    for i, row in enumerate(rows):
        table[i, :len(row)] = row
    return table


def _slots_needed(rows_per_epoch: list[list[list[int]]]) -> int:
    most = max(len(row) for rows in rows_per_epoch for row in rows)
    return 1 << (most - 1).bit_length()  # a power of two: few distinct shapes across runs


def pair_lengths(store: PairStore, plan: BatchPlan) -> np.ndarray:
    """[N, sides] row lengths a pair takes: (chosen, rejected), or (shared row,) with prefix sharing."""
    return shared_row_lengths(store) if plan.prefix_sharing else store.lengths


def _schedule(lengths: np.ndarray, rows_per_epoch: list[list[list[int]]], batch_size: int, max_length: int,
              keep_partial: bool) -> Schedule:
    slots = _slots_needed(rows_per_epoch)
    buckets = bucket_lengths(max_length)
    batches, counts = [], []
    for rows in rows_per_epoch:
        table = _to_slots(rows, slots)
        steps = -(-len(table) // batch_size) if keep_partial else len(table) // batch_size
        filled = np.full((steps * batch_size, slots), -1, np.int32)
        filled[:min(len(table), len(filled))] = table[:len(filled)]
        batches.append(filled.reshape(steps, batch_size, slots))
        counts.append(steps)
    rows = np.concatenate(batches)  # [steps, batch rows, slots]
    side_lengths = np.where(rows[..., None] >= 0, lengths[np.maximum(rows, 0)], 0)  # [steps, rows, slots, sides]
    longest = side_lengths.sum(axis=2).max(axis=(1, 2))  # [steps]: the longest row side of each batch
    lengths = np.asarray(buckets, np.int32)[np.searchsorted(buckets, longest)]  # the bucket holding it
    return Schedule(rows, lengths, tuple(counts))


def _rows_in_order(lengths: np.ndarray, order: np.ndarray, plan: BatchPlan) -> list[list[int]]:
    """The pairs in `order` as rows: packed, or one pair per row."""
    return pack_rows(order, lengths, plan.row_length) if plan.packing else [[int(i)] for i in order]


def training_schedule(store: PairStore, plan: BatchPlan) -> Schedule:
    lengths = pair_lengths(store, plan)
    rows_per_epoch = [_rows_in_order(lengths, epoch_order(len(store), plan.seed, epoch, plan.shuffle), plan)
                      for epoch in range(plan.epochs)]
    if len(rows_per_epoch[0]) < plan.batch_size:
        raise DataError(f"{len(store)} pairs make {len(rows_per_epoch[0])} rows, too few for one batch of "
                         f"{plan.batch_size} (trainer.batch_size)")
    return _schedule(lengths, rows_per_epoch, plan.batch_size, plan.row_length, keep_partial=False)


def eval_schedule(store: PairStore, plan: BatchPlan) -> Schedule:
    """Every pair once, in order; the last batch is completed with empty rows."""
    lengths = pair_lengths(store, plan)
    rows = _rows_in_order(lengths, np.arange(len(store)), plan)
    return _schedule(lengths, [rows], plan.batch_size, plan.row_length, keep_partial=True)


@dataclasses.dataclass(frozen=True)
class BatchBuilder:
    """Builds one process's share of a scheduled global batch."""
    store: PairStore
    schedule: Schedule
    plan: BatchPlan
    process_index: int = 0
    process_count: int = 1
    reference_logps: Optional[np.ndarray] = None  # [pairs, 2] precomputed reference logps, added to batches

    def __post_init__(self):
        rows = self.schedule.rows.shape[1]
        if rows % self.process_count:
            raise ValueError(f"a batch of {rows} rows does not split over {self.process_count} processes")

    def pair_indices(self, step: int) -> np.ndarray:
        """[rows of this process, slots] pair indices of batch `step` (-1: empty)."""
        share = self.schedule.rows.shape[1] // self.process_count
        return self.schedule.rows[step, self.process_index * share:(self.process_index + 1) * share]

    def __call__(self, step: int) -> Batch:
        indices = self.pair_indices(step)
        rows = [[self.store.pair(i) for i in row if i >= 0] for row in indices]
        layout = collate_shared if self.plan.prefix_sharing else collate
        batch = layout(rows, int(self.schedule.lengths[step]), self.schedule.rows.shape[2], self.plan.pad_id)
        if self.reference_logps is not None:
            batch = batch.replace(ref_logps=np.where(indices[..., None] >= 0,
                                                     self.reference_logps[np.maximum(indices, 0)], 0.0))
        if self.store.labels is not None:
            batch = batch.replace(labels=np.where(indices >= 0, self.store.labels[np.maximum(indices, 0)],
                                                  0).astype(np.float32))
        return batch


def batch_tokens(batch: Batch) -> int:
    """Chosen + rejected tokens in a batch (a shared prompt counted twice), so layouts compare in tokens/s."""
    return sequence_tokens(batch.segment_ids) if batch.shared else int(np.count_nonzero(batch.segment_ids))


def batch_dataset(builder: BatchBuilder) -> grain.MapDataset:
    return grain.MapDataset.range(len(builder.schedule)).map(builder)


class BatchIterator:
    """Prefetching iterator over the batches of a schedule whose position is checkpointable.

    `state()` describes the batches consumed so far (not those prefetched) together with the data's
    fingerprint; `restore` refuses a state taken on other data.
    """

    def __init__(self, dataset: grain.MapDataset, fingerprint: str, prefetch: int = 4):
        self.fingerprint = fingerprint
        self._iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Batch:
        return next(self._iterator)

    def state(self) -> dict:
        return {"fingerprint": self.fingerprint, "grain": self._iterator.get_state()}

    def restore(self, state: dict, where: str) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise DataError(f"{where} was written while training on other data or batches (the data, tokenizer, "
                             "data.* settings, trainer.batch_size, trainer.epochs, run.seed or, for KTO, "
                             "trainer.micro_batch_size differ); resuming "
                             "would not continue the same run")
        self._iterator.set_state(state["grain"])


def batch_iterator(builder: BatchBuilder, fingerprint: str) -> BatchIterator:
    return BatchIterator(batch_dataset(builder), fingerprint)
