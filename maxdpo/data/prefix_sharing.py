"""Prefix sharing: a pair as one row `prompt | chosen | rejected`, so the shared prompt is computed once.

Segment ids follow `maxdpo.kernels.attention_blocks.PREFIX_GROUP`: 4 * (slot + 1) + branch, branch 0 on
the shared prompt, 1 on the rest of the chosen sequence, 2 on the rest of the rejected one; attention
lets a token see its own branch and its pair's prompt. Positions restart after the prompt for the
rejected branch, so every token has the position it has in its own sequence. The shared part is the
longest common start of the two prompts (normally the whole prompt).

The first rejected token is predicted by the last prompt token, not by its left neighbour (the last
chosen token): its id goes into `prefix_target` at the last prompt position, and its
`completion_mask` entry (which means "predicted by the token on its left") is 0. The batch has the
`batch.SHARED` layout.
"""
from __future__ import annotations

import numpy as np

from maxdpo.data.batch import SHARED, Batch, empty_batch
from maxdpo.data.store import PairStore
from maxdpo.data.tokenize import TokenizedPair
from maxdpo.kernels.attention_blocks import PREFIX_GROUP

PROMPT, CHOSEN, REJECTED = 0, 1, 2


def shared_prompt_length(pair: TokenizedPair) -> int:
    """Tokens the chosen and rejected prompts share from the start."""
    n = min(pair.chosen_prompt_len, pair.rejected_prompt_len)
    differ = np.flatnonzero(pair.chosen[:n] != pair.rejected[:n])
    return int(differ[0]) if len(differ) else n


def shared_row_lengths(store: PairStore) -> np.ndarray:
    """[N, 1]: the length of each pair laid out as one shared row."""
    shared = np.asarray([shared_prompt_length(store.pair(i)) for i in range(len(store))], np.int64)
    return (store.lengths.sum(axis=1) - shared)[:, None]


def sequence_tokens(segment_ids: np.ndarray) -> int:
    """Tokens of the chosen and rejected sequences in shared rows, the prompt counted for both."""
    real = segment_ids > 0
    return int(np.count_nonzero(real) + np.count_nonzero(real & (segment_ids % PREFIX_GROUP == PROMPT)))


def collate_shared(rows: list[list[TokenizedPair]], length: int, slots: int, pad_id: int) -> Batch:
    """Rows of pairs in the shared layout above, padded to `length`."""
    batch = empty_batch(SHARED, len(rows), length, slots, pad_id)
    for r, pairs in enumerate(rows):
        cursor = 0
        for slot, pair in enumerate(pairs):
            batch.pair_mask[r, slot] = 1.0
            shared = shared_prompt_length(pair)
            parts = ((PROMPT, pair.chosen[:shared], 0, shared),  # (branch, tokens, first position, prompt length)
                     (CHOSEN, pair.chosen[shared:], shared, pair.chosen_prompt_len),
                     (REJECTED, pair.rejected[shared:], shared, pair.rejected_prompt_len))
            for branch, tokens, first, prompt_len in parts:
                start, end = cursor, cursor + len(tokens)
                positions = np.arange(first, first + len(tokens))
                batch.input_ids[r, 0, start:end] = tokens
                batch.positions[r, 0, start:end] = positions
                batch.segment_ids[r, 0, start:end] = PREFIX_GROUP * (slot + 1) + branch
                batch.completion_mask[r, 0, start:end] = positions >= prompt_len
                if len(tokens) and (first == 0 or branch == REJECTED):  # not predicted by its left neighbour
                    batch.completion_mask[r, 0, start] = 0
                    if first > 0 and first >= prompt_len:  # a completion token: the last prompt token predicts it
                        batch.prefix_target[r, 0, start - len(pair.chosen) + shared - 1] = tokens[0]
                cursor = end
    return batch
