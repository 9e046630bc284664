"""Tokenises preference pairs as TRL does for text.

Completion tokens are the tokens of prompt+completion beyond the prompt's own tokens (one token back
when the tokenizer merged across the boundary); BOS is put in front once, EOS ends every completion.
Too-long pairs are cut as TRL cuts them: first the prompt to `max_prompt_length` (keeping its start or
end, BOS kept), then the completions to what `max_length` leaves. A prompt longer than `max_length`
itself is not a pair that truncation can save: it is an invalid row.

An SFT example (no rejected text) gets a one-token rejected stub, the chosen side's first token with no
completion tokens: it costs one position in a packed row and adds nothing to the SFT loss.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from maxdpo.data.formats import InvalidRow
from maxdpo.data.sources import DataError


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    chosen: np.ndarray  # [prompt + completion] token ids
    rejected: np.ndarray
    chosen_prompt_len: int
    rejected_prompt_len: int


@dataclasses.dataclass(frozen=True)
class Truncation:
    prompt: bool  # the prompt was cut to max_prompt_length
    completion: bool  # a completion was cut to fit max_length


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batched encoding (fast tokenizers spread a batch over threads)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _split(full: list[int], prompt_ids: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of prompt+completion's tokens, given the prompt's own tokens."""
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
        body = body[:keep] if self.truncation == "keep_start" else body[max(0, len(body) - keep):]
        return head + body

    def _assemble(self, sides: list[tuple[list[int], list[int]]]) -> tuple[TokenizedPair, Truncation]:
        sides = [self._with_specials(p, c) for p, c in sides]
        longest_prompt = max(len(p) for p, _ in sides)
        if longest_prompt > self.max_length:
            raise InvalidRow(f"the prompt has {longest_prompt} tokens, more than data.max_length={self.max_length}")
        longest_completion = max(len(c) for _, c in sides)
        cut_prompt = cut_completion = False
        if longest_prompt + longest_completion > self.max_length:
            cut_prompt = longest_prompt > self.max_prompt_length
            sides = [(self._truncate_prompt(p), c) for p, c in sides]
            completion_budget = self.max_length - max(len(p) for p, _ in sides)
            cut_completion = longest_completion > completion_budget
            sides = [(p, c[:completion_budget]) for p, c in sides]
        (chosen_prompt, chosen_completion), (rejected_prompt, rejected_completion) = sides
        pair = TokenizedPair(
            chosen=np.asarray(chosen_prompt + chosen_completion, np.int32),
            rejected=np.asarray(rejected_prompt + rejected_completion, np.int32),
            chosen_prompt_len=len(chosen_prompt), rejected_prompt_len=len(rejected_prompt))
        return pair, Truncation(cut_prompt, cut_completion)

    def encode_many(self, texts: list[tuple[str, str, Optional[str]]]) -> list:
        """For each (prompt, chosen, rejected or None): (TokenizedPair, Truncation), or the InvalidRow it raised."""
        prompts = _encode(self.tokenizer, [p for p, _, _ in texts])
        fulls = _encode(self.tokenizer, [p + c for p, c, _ in texts] + [p + (r or "") for p, _, r in texts])
        results = []
        for index, prompt_ids in enumerate(prompts):
            sides = [_split(fulls[index], prompt_ids), _split(fulls[len(texts) + index], prompt_ids)]
            try:
                pair, truncation = self._assemble(sides)
                if texts[index][2] is None:  # SFT
                    pair = dataclasses.replace(pair, rejected=pair.chosen[:1], rejected_prompt_len=1)
                results.append((pair, truncation))
            except InvalidRow as err:
                results.append(err)
        return results

    def __call__(self, prompt: str, chosen: str, rejected: Optional[str]) -> tuple[TokenizedPair, Truncation]:
        result = self.encode_many([(prompt, chosen, rejected)])[0]
        if isinstance(result, InvalidRow):
            raise result
        return result
