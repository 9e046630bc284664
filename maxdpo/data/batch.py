"""The batch the train, eval and reference steps take: a pytree whose layout is a static field.

Two layouts (K pair slots per row: 1, or more when packing; T the padded length):
- PAIRED: side axis 2, row 0 the chosen sequences, row 1 the rejected ones (`collate`). Positions
  restart at 0 for each packed pair, segment ids are k+1 on the tokens of pair slot k (0 on padding),
  completion_mask is 1 on completion tokens (the tokens whose log-probs count).
- SHARED: side axis 1, a pair as one row `prompt | chosen | rejected` (`prefix_sharing.collate_shared`),
  with `prefix_target`.

  input_ids, positions, segment_ids, completion_mask  [rows, sides, T] int32
  pair_mask                                            [rows, K]        float32
  prefix_target  (SHARED only)                         [rows, 1, T]     int32, -1: none
  ref_logps      (precomputed reference only)          [rows, K, 2]     float32 (chosen, rejected)
  labels         (unpaired losses only)                [rows, K]        float32, 1: desirable
Fields that a layout or run does not use are None.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

if TYPE_CHECKING:
    from maxdpo.data.tokenize import TokenizedPair

PAIRED, SHARED = "paired", "shared"
SIDES = {PAIRED: 2, SHARED: 1}
SEQUENCE_FIELDS = ("input_ids", "positions", "segment_ids", "completion_mask")


@struct.dataclass
class Batch:
    input_ids: Any
    positions: Any
    segment_ids: Any
    completion_mask: Any
    pair_mask: Any
    layout: str = struct.field(pytree_node=False)
    prefix_target: Any = None
    ref_logps: Any = None
    labels: Any = None

    @property
    def shared(self) -> bool:
        return self.layout == SHARED

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def slots(self) -> int:
        return self.pair_mask.shape[1]

    @classmethod
    def abstract(cls, layout: str, rows: int, length: int, slots: int = 1, ref_logps: bool = False,
                 labels: bool = False) -> "Batch":
        """ShapeDtypeStructs of a batch of `rows` rows padded to `length` tokens."""
        tokens = jax.ShapeDtypeStruct((rows, SIDES[layout], length), jnp.int32)
        prefix_target = jax.ShapeDtypeStruct((rows, 1, length), jnp.int32) if layout == SHARED else None
        per_slot = jax.ShapeDtypeStruct((rows, slots), jnp.float32)
        return cls(*(tokens,) * len(SEQUENCE_FIELDS), pair_mask=per_slot, layout=layout, prefix_target=prefix_target,
                   ref_logps=jax.ShapeDtypeStruct((rows, slots, 2), jnp.float32) if ref_logps else None,
                   labels=per_slot if labels else None)

    def side(self, index: int) -> "Batch":
        """The paired layout's chosen (0) or rejected (1) sequences alone: sequence fields [rows, 1, T]."""
        return self.replace(**{name: getattr(self, name)[:, index:index + 1] for name in SEQUENCE_FIELDS})

    def flat(self, name: str) -> jax.Array:
        """A sequence field with rows and sides merged: [rows * sides, T]."""
        value = getattr(self, name)
        return value.reshape(-1, value.shape[-1])


def layout_of(prefix_sharing: bool) -> str:
    return SHARED if prefix_sharing else PAIRED


def longest_row(layout: str, max_length: int) -> int:
    """Tokens a row of one pair may need: one sequence, or with a shared prompt both (at most)."""
    return 2 * max_length if layout == SHARED else max_length


def empty_batch(layout: str, rows: int, length: int, slots: int, pad_id: int) -> Batch:
    """Host arrays of an all-padding batch, for the collate functions to fill."""
    sides = SIDES[layout]
    tokens = {name: np.zeros((rows, sides, length), np.int32) for name in SEQUENCE_FIELDS}
    tokens["input_ids"][:] = pad_id
    prefix_target = np.full((rows, 1, length), -1, np.int32) if layout == SHARED else None
    return Batch(**tokens, pair_mask=np.zeros((rows, slots), np.float32), prefix_target=prefix_target,
                 layout=layout)


def collate(rows: list[list[TokenizedPair]], length: int, slots: int, pad_id: int) -> Batch:
    """Host arrays of rows of pairs in the paired layout (module docstring), padded to `length`."""
    batch = empty_batch(PAIRED, len(rows), length, slots, pad_id)
    for r, pairs in enumerate(rows):
        cursor = [0, 0]
        for slot, pair in enumerate(pairs):
            batch.pair_mask[r, slot] = 1.0
            for side, (sequence, prompt_len) in enumerate(((pair.chosen, pair.chosen_prompt_len),
                                                           (pair.rejected, pair.rejected_prompt_len))):
                start, end = cursor[side], cursor[side] + len(sequence)
                batch.input_ids[r, side, start:end] = sequence
                batch.positions[r, side, start:end] = np.arange(len(sequence))
                batch.segment_ids[r, side, start:end] = slot + 1
                batch.completion_mask[r, side, start + prompt_len:end] = 1
                cursor[side] = end
    return batch
