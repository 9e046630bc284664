"""Tokenisation rules (TRL parity over tokenizer kinds is tests/test_tokenize_as_trl.py): EOS ending completions,
the shared prompt boundary, truncation edge cases."""
import pytest
from transformers import AutoTokenizer

from maxdpo.data.formats import InvalidRow
from maxdpo.data.sources import resolve_path
from maxdpo.data.tokenize import PairTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer"))


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_pair_tokenisation_follows_trl(tokenizer):
    pair, truncated = PairTokenizer(tokenizer, 32, 16)("add 1 + 2 =", " 3", " 4")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = [bos] + _ids(tokenizer, "add 1 + 2 =")
    assert pair.chosen.tolist() == prompt + _ids(tokenizer, "3") + [eos]
    assert pair.rejected.tolist() == prompt + _ids(tokenizer, "4") + [eos]
    assert pair.chosen_prompt_len == pair.rejected_prompt_len == len(prompt)
    assert not truncated.prompt and not truncated.completion


def test_a_completion_that_ends_with_eos_gets_no_second_one(tokenizer):
    pair, _ = PairTokenizer(tokenizer, 32, 16)("copy a b :", f" a b {tokenizer.eos_token}", " a c")
    assert pair.chosen.tolist().count(tokenizer.eos_token_id) == 1
    assert pair.rejected[-1] == tokenizer.eos_token_id


def test_a_merge_across_the_boundary_moves_both_sides_prompt_back():
    """With a BPE tokenizer, a prompt ending mid-word merges with one completion's start: as in TRL, the prompt
    of both sides ends where the first side departs from the prompt's own tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4, "c": 5}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    core.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    bpe = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    pair, _ = PairTokenizer(bpe, 16, 8)("ca", "b", "c")  # no post-processor: no BOS
    assert pair.chosen.tolist() == [5, 4, 1]  # c | ab </s>: "ab" counts as completion
    assert pair.rejected.tolist() == [5, 2, 5, 1]  # c | a c </s>
    assert pair.chosen_prompt_len == pair.rejected_prompt_len == 1


@pytest.mark.parametrize("mode,kept", [("keep_end", "d e :"), ("keep_start", "copy a b")])
def test_truncation_cuts_prompt_then_completion(tokenizer, mode, kept):
    prompt = "copy a b c d e :"  # BOS + 7 tokens: exactly max_length, so still a valid row
    pair, truncated = PairTokenizer(tokenizer, 8, 4, mode)(prompt, " a b c d e f", " a b")
    assert truncated.prompt and truncated.completion
    expected_prompt = [tokenizer.bos_token_id] + _ids(tokenizer, kept)
    assert pair.chosen[:4].tolist() == expected_prompt and pair.chosen_prompt_len == 4
    assert len(pair.chosen) == 8 and pair.chosen[4:].tolist() == _ids(tokenizer, "a b c d")
    assert pair.rejected.tolist() == expected_prompt + _ids(tokenizer, "a b") + [tokenizer.eos_token_id]


def test_long_prompt_with_room_for_completions_is_cut_only_at_the_prompt(tokenizer):
    """BOS + 6 prompt tokens + 2 completion tokens > 8: the prompt is cut to 4, the completions stay whole."""
    pair, truncated = PairTokenizer(tokenizer, 8, 4)("copy a b c d :", " a", " b")
    assert truncated.prompt and not truncated.completion
    assert pair.chosen_prompt_len == 4 and pair.chosen[4:].tolist() == _ids(tokenizer, "a") + [tokenizer.eos_token_id]


def test_exact_fit_is_not_truncated(tokenizer):
    prompt, completion = "copy a b :", " a b"  # BOS + 4 prompt tokens + 2 completion tokens + EOS = 8
    pair, truncated = PairTokenizer(tokenizer, 8, 4)(prompt, completion, " a")
    assert len(pair.chosen) == 8 and not truncated.prompt and not truncated.completion


def test_completion_cut_to_the_budget_loses_its_eos(tokenizer):
    """As in TRL, a completion cut short has no EOS: the model is not taught to stop there."""
    pair, truncated = PairTokenizer(tokenizer, 6, 4)("copy :", " a b c d", " a")
    assert truncated.completion and not truncated.prompt
    assert pair.chosen.tolist() == [tokenizer.bos_token_id] + _ids(tokenizer, "copy : a b c")
    assert pair.rejected[-1] == tokenizer.eos_token_id


def test_prompt_longer_than_max_length_is_invalid(tokenizer):
    with pytest.raises(InvalidRow, match="the prompt has 11 tokens, more than data.max_length=10"):
        PairTokenizer(tokenizer, 10, 4)("copy a b c d e f g h :", " a", " b")
