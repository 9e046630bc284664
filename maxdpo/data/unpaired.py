"""Unpaired examples (KTO, BCO) in TRL's order, each with the mismatched completion KTO's KL estimate reads.

A tokenised unpaired example is a `TokenizedPair` whose chosen sequence is prompt + completion and whose
rejected place holds the same prompt with another example's completion (`with_mismatched`), or the SFT
stub when the loss needs none. Being a pair, it packs, shards, shares its prompt and has its reference
log-probs precomputed like any preference pair.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from maxdpo.data.tokenize import TokenizedPair

@dataclasses.dataclass(frozen=True)
class Unpaired:
    """How a run's unpaired examples are built: with KTO's mismatched completions rotated within chunks of
    `kl_chunk` examples (`with_mismatched`), or (0) with the one-token stub."""
    kl_chunk: int


UNPAIR_BLOCK = 1000  # rows per `datasets.map` batch, within which TRL's unpair_preference_dataset puts every
# chosen completion before every rejected one


def unpaired_order(rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The order TRL's unpair_preference_dataset gives examples of preference rows: per block of 1000 source
    rows, the chosen (label 1) examples, then the rejected ones, each in row order."""
    return np.lexsort((rows, 1 - labels, rows // UNPAIR_BLOCK))


def with_mismatched(examples: list[TokenizedPair], chunk: int, max_length: int) -> list[TokenizedPair]:
    """Each example with, in its rejected place, its prompt followed by the completion of the example before it
    in its chunk of `chunk` consecutive examples in data order (the first takes the last one's), cut to
    `max_length` tokens: TRL's KTOTrainer rotation (x_1, y_n), (x_2, y_1), ..., (x_n, y_(n-1)), which TRL applies
    within each per-device batch and maxdpo within each global micro-batch (the same on one device). A shuffled
    example travels with its partner."""
    mismatched = []
    for start in range(0, len(examples), chunk):
        block = examples[start:start + chunk]
        for index, example in enumerate(block):
            other = block[index - 1]
            prompt = example.chosen[:example.chosen_prompt_len]
            sequence = np.concatenate([prompt, other.chosen[other.chosen_prompt_len:]])[:max_length]
            mismatched.append(dataclasses.replace(example, rejected=sequence,
                                                  rejected_prompt_len=example.chosen_prompt_len))
    return mismatched
