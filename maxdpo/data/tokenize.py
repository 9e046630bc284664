"""Tokenises preference pairs as TRL does for plain text.

Completion tokens are the tokens of prompt+completion beyond the prompt's own tokens (one token back
when the tokenizer merged across the boundary); BOS is put in front once, EOS ends every completion.
Too-long pairs are cut as TRL cuts them: first the prompt to `max_prompt_length` (keeping its start or
end, BOS kept), then the completions to `max_length - max_prompt_length`.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from maxdpo.data.sources import DataError


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    chosen: np.ndarray  # [prompt + completion] token ids
    rejected: np.ndarray
    chosen_prompt_len: int
    rejected_prompt_len: int


@dataclasses.dataclass
class TokenizeStats:
    pairs: int = 0
    truncated: int = 0


def split_prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) where both come from tokenising prompt+completion together."""
    full = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    if full[:start] != prompt_ids:  # the last prompt token merged with the completion's first
        start -= 1
    return full[:start], full[start:]


class PairTokenizer:
    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, truncation: str = "keep_end"):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; completions must end with one")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation

    def _with_specials(self, prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[int], list[int]]:
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        has_bos = bos is not None and prompt_ids[:1] == [bos]
        body = prompt_ids[1:] if has_bos else prompt_ids
        head = [bos] if bos is not None else []
        if not completion_ids or completion_ids[-1] != eos:
            completion_ids = completion_ids + [eos]
        return head + body, completion_ids

    def _truncate_prompt(self, prompt_ids: list[int]) -> list[int]:
        bos = self.tokenizer.bos_token_id
        head = prompt_ids[:1] if bos is not None and prompt_ids[:1] == [bos] else []
        body = prompt_ids[len(head):]
        keep = self.max_prompt_length - len(head)
        body = body[:keep] if self.truncation == "keep_start" else body[len(body) - keep:]
        return head + body

    def __call__(self, prompt: str, chosen: str, rejected: str) -> tuple[TokenizedPair, bool]:
        """The tokenized pair and whether it had to be truncated."""
        sides = [self._with_specials(*split_prompt_completion(self.tokenizer, prompt, completion))
                 for completion in (chosen, rejected)]
        longest_completion = max(len(completion) for _, completion in sides)
        truncated = False
        if any(len(p) + longest_completion > self.max_length for p, _ in sides):
            truncated = True
            sides = [(self._truncate_prompt(p), c) for p, c in sides]
            completion_budget = self.max_length - max(len(p) for p, _ in sides)
            sides = [(p, c[:completion_budget]) for p, c in sides]
        (chosen_prompt, chosen_completion), (rejected_prompt, rejected_completion) = sides
        pair = TokenizedPair(
            chosen=np.asarray(chosen_prompt + chosen_completion, np.int32),
            rejected=np.asarray(rejected_prompt + rejected_completion, np.int32),
            chosen_prompt_len=len(chosen_prompt), rejected_prompt_len=len(rejected_prompt))
        return pair, truncated


def _check_text(value, column: str, row: int, source: str) -> str:
    if value is None:
        raise DataError(f"{source}: row {row} has no '{column}'")
    if not isinstance(value, str):
        raise DataError(f"{source}: row {row} column '{column}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{source}: row {row} column '{column}' is empty")
    return value


def tokenize_rows(rows: Iterable[dict], pair_tokenizer: PairTokenizer, columns, source: str
                  ) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Validates and tokenises plain prompt/chosen/rejected rows; a bad row raises DataError naming it."""
    pairs, stats = [], TokenizeStats()
    names = (columns.prompt, columns.chosen, columns.rejected)
    for index, row in enumerate(rows):
        prompt, chosen, rejected = (_check_text(row.get(name), name, index, source) for name in names)
        pair, truncated = pair_tokenizer(prompt, chosen, rejected)
        pairs.append(pair)
        stats.pairs += 1
        stats.truncated += truncated
    return pairs, stats
