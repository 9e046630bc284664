"""Tokenised pairs in flat arrays: cheap to keep in memory, to index at random and to cache on disk."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np

from maxdpo.atomic import atomic_path
from maxdpo.data.tokenize import TokenizedPair


@dataclasses.dataclass(frozen=True)
class PairStore:
    tokens: np.ndarray  # [total] int32: every pair's chosen then rejected sequence
    starts: np.ndarray  # [N, 2] int64 offsets into tokens (chosen, rejected)
    lengths: np.ndarray  # [N, 2] int32 sequence lengths
    prompt_lengths: np.ndarray  # [N, 2] int32
    rows: np.ndarray  # [N] int64 index of each pair's row in its source
    labels: Optional[np.ndarray] = None  # [N] int8, unpaired examples only: 1 desirable, 0 undesirable

    def __len__(self) -> int:
        return len(self.rows)

    def pair(self, index: int) -> TokenizedPair:
        (c0, r0), (cn, rn) = self.starts[index], self.lengths[index]
        return TokenizedPair(self.tokens[c0:c0 + cn], self.tokens[r0:r0 + rn], int(self.prompt_lengths[index, 0]),
                             int(self.prompt_lengths[index, 1]))

    @classmethod
    def from_pairs(cls, pairs: list[TokenizedPair], rows: list[int],
                   labels: Optional[list[int]] = None) -> "PairStore":
        lengths = np.asarray([(len(p.chosen), len(p.rejected)) for p in pairs], np.int32).reshape(-1, 2)
        starts = np.concatenate([[0], np.cumsum(lengths.ravel())[:-1]]).astype(np.int64).reshape(-1, 2)
        sequences = [s for p in pairs for s in (p.chosen, p.rejected)]
        tokens = np.concatenate(sequences).astype(np.int32) if sequences else np.zeros((0,), np.int32)
        prompt_lengths = np.asarray([(p.chosen_prompt_len, p.rejected_prompt_len) for p in pairs],
                                    np.int32).reshape(-1, 2)
        return cls(tokens, starts, lengths, prompt_lengths, np.asarray(rows, np.int64),
                   None if labels is None else np.asarray(labels, np.int8))

    def save(self, path: Path, report: dict) -> None:
        """Writes atomically: readers see the old file or the complete new one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, report=np.asarray(json.dumps(report)),
                     **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                        if getattr(self, f.name) is not None})

    @classmethod
    def load(cls, path: Path) -> tuple["PairStore", dict]:
        with np.load(path) as content:
            store = cls(**{f.name: content[f.name] for f in dataclasses.fields(cls) if f.name in content})
            return store, json.loads(str(content["report"]))
