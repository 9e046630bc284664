"""Tokenises preference pairs as TRL's DPOTrainer (1.16) does.

A pair is three texts: the prompt, prompt + chosen and prompt + rejected. Plain-text rows are tokenised
by calling the tokenizer as it is, so a BOS (or any special token) appears exactly where the tokenizer's
own post-processor puts one, and each completion ends with the EOS token's text (unless it already ends
with it). Conversations are rendered by the chat template and tokenised without added special tokens, as
`apply_chat_template(tokenize=True)` does: the template writes them. The prompt ends where the prompt's
tokens and those of both prompt + completion sequences first differ, which is earlier than the prompt's
own end when a token merges across the boundary or a template renders a prompt alone differently; both
sequences share that prompt.

Too-long pairs are cut: first the prompt to `max_prompt_length` (keeping its start or end, a leading BOS
kept), then the completions to what `max_length` leaves. A prompt longer than `max_length` itself is not a
pair that truncation can save: it is an invalid row.

An SFT example (no rejected text) gets a one-token rejected stub, the chosen side's first token with no
completion tokens: it costs one position in a packed row and adds nothing to the SFT loss.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from maxdpo.data.formats import InvalidRow


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
    boundary_moved: bool = False  # the prompt ends before its own last token (see the module docstring)


def _encode(tokenizer, texts: list[str], special_tokens: bool) -> list[list[int]]:
    """Batched encoding (fast tokenizers spread a batch over threads)."""
    return tokenizer(texts, add_special_tokens=special_tokens)["input_ids"] if texts else []


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    """Leading tokens `ids` and `other` have in common."""
    for index, (a, b) in enumerate(zip(ids, other)):
        if a != b:
            return index
    return min(len(ids), len(other))


class PairTokenizer:
    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, truncation: str = "keep_end"):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation

    def plain_texts(self, prompt: str, chosen: str, rejected: Optional[str]) -> tuple[str, str, Optional[str]]:
        """(prompt, prompt + chosen, prompt + rejected) of a plain-text row, each completion ending in EOS."""
        eos = self.tokenizer.eos_token
        ended = [None if text is None else text if text.endswith(eos) else text + eos for text in (chosen, rejected)]
        return prompt, prompt + ended[0], None if ended[1] is None else prompt + ended[1]

    def _truncate_prompt(self, prompt_ids: list[int]) -> list[int]:
        bos = self.tokenizer.bos_token_id
        head = prompt_ids[:1] if bos is not None and prompt_ids[:1] == [bos] else []
        body = prompt_ids[len(head):]
        keep = self.max_prompt_length - len(head)
        body = body[:keep] if self.truncation == "keep_start" else body[max(0, len(body) - keep):]
        return head + body

    def _assemble(self, sides: list[tuple[list[int], list[int]]]) -> tuple[TokenizedPair, Truncation]:
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

    def encode_many(self, texts: list[tuple[str, str, Optional[str]]], rendered: bool) -> list:
        """For each (prompt, prompt + chosen, prompt + rejected or None) text, rendered by a chat template or
        plain (`plain_texts`): (TokenizedPair, Truncation), or the InvalidRow it raised."""
        prompts = _encode(self.tokenizer, [p for p, _, _ in texts], not rendered)
        fulls = _encode(self.tokenizer, [c for _, c, _ in texts] + [r or c for _, c, r in texts], not rendered)
        results = []
        for index, prompt_ids in enumerate(prompts):
            chosen, rejected = fulls[index], fulls[len(texts) + index]
            boundary = min(common_prefix_length(prompt_ids, chosen), common_prefix_length(prompt_ids, rejected))
            try:
                pair, truncation = self._assemble([(chosen[:boundary], chosen[boundary:]),
                                                   (rejected[:boundary], rejected[boundary:])])
                truncation = dataclasses.replace(truncation, boundary_moved=boundary < len(prompt_ids))
                if texts[index][2] is None:  # SFT
                    pair = dataclasses.replace(pair, rejected=pair.chosen[:1], rejected_prompt_len=1)
                results.append((pair, truncation))
            except InvalidRow as err:
                results.append(err)
        return results

    def __call__(self, prompt: str, chosen: str, rejected: Optional[str]) -> tuple[TokenizedPair, Truncation]:
        """A plain-text row."""
        result = self.encode_many([self.plain_texts(prompt, chosen, rejected)], rendered=False)[0]
        if isinstance(result, InvalidRow):
            raise result
        return result
