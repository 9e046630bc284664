"""maxdpo's tokenised pairs equal the prompt/chosen/rejected ids TRL's DPOTrainer (1.16) prepares from the same
rows, for tokenizers that add a BOS, define one but do not add it, have none, or merge tokens across the
prompt/completion boundary; plain text and conversations through a chat template."""
import pytest
import trl
from datasets import Dataset
from transformers import AutoTokenizer

from hf_models import tiny_llama
from maxdpo.config import DataConfig
from maxdpo.data.formats import detect_format
from maxdpo.data.pipeline import DataSettings, PairBuilder
from maxdpo.data.templates import BUILTIN_TEMPLATES
from tokenizer_kinds import KINDS, make_tokenizer

WORD_ROWS = [
    {"prompt": "add 1 + 2 =", "chosen": " 3", "rejected": " 4"},
    {"prompt": "copy a b c :", "chosen": " a b c<eos>", "rejected": " a b"},  # one already ends with EOS
    {"prompt": "<bos> parity of 7 ?", "chosen": " odd", "rejected": " even"},  # BOS written in the text
    {"prompt": "next after a ?", "chosen": " b", "rejected": " z y x w"},
]
BPE_ROWS = [
    {"prompt": "c", "chosen": "ab", "rejected": "a = b"},  # "ca" merges in rejected only: boundary at 0
    {"prompt": "ab =", "chosen": " c", "rejected": " ab"},
    {"prompt": "a", "chosen": "b", "rejected": "b b"},  # "ab" merges on both sides
]
CONVERSATIONS = [
    {"prompt": [{"role": "user", "content": "add 1 + 2 ="}], "chosen": [{"role": "assistant", "content": "3"}],
     "rejected": [{"role": "assistant", "content": "4"}]},
    {"prompt": [{"role": "user", "content": " copy a b :\n"}, {"role": "assistant", "content": "a b"},
                {"role": "user", "content": "again"}],
     "chosen": [{"role": "assistant", "content": "a b"}], "rejected": [{"role": "assistant", "content": " b a "}]},
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_llama(folder)
    return str(folder)


def trl_ids(model, tokenizer, rows, tmp):
    args = trl.DPOConfig(output_dir=str(tmp / "trl"), report_to=[], use_cpu=True, dataset_num_proc=None)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in trainer.train_dataset]


def maxdpo_pairs(tokenizer, rows, chat_template="auto"):
    settings = DataSettings.from_config(DataConfig(chat_template=chat_template, max_length=64, max_prompt_length=32),
                                        tokenizer)
    dataset = Dataset.from_list(rows)
    row_format = detect_format(dataset.features, rows[0], DataConfig().columns, "auto", "rows")
    result = PairBuilder(tokenizer, settings, row_format).build(rows, 0)
    assert not result.invalid
    return [pair for _, pair, _ in result.pairs], result.truncation["boundary_moved"]


def assert_same(trl_rows, pairs):
    for (prompt, chosen, rejected), pair in zip(trl_rows, pairs, strict=True):
        assert pair.chosen.tolist() == prompt + chosen and pair.rejected.tolist() == prompt + rejected
        assert pair.chosen_prompt_len == pair.rejected_prompt_len == len(prompt)


@pytest.mark.parametrize("kind", KINDS)
def test_plain_text_pairs_equal_trls(tmp_path, model, kind):
    tokenizer = AutoTokenizer.from_pretrained(make_tokenizer(kind, tmp_path / kind))
    rows = BPE_ROWS if kind == "bpe_merges" else WORD_ROWS
    pairs, moved = maxdpo_pairs(tokenizer, rows)
    assert_same(trl_ids(model, tokenizer, rows, tmp_path), pairs)
    assert moved == (2 if kind == "bpe_merges" else 0)  # counted for the data report
    if kind == "bpe_merges":
        assert pairs[0].chosen_prompt_len == 0  # TRL's rule: the prompt ends where any side departs from it
    else:
        assert (pairs[0].chosen[0] == tokenizer.bos_token_id) == (kind == "adds_bos")


@pytest.mark.parametrize("template", ["mistral", "chatml", "llama3"])
def test_conversations_equal_trls(tmp_path, model, template):
    tokenizer = AutoTokenizer.from_pretrained(make_tokenizer("adds_bos", tmp_path / "tok"))
    tokenizer.chat_template = BUILTIN_TEMPLATES[template]
    assert_same(trl_ids(model, tokenizer, CONVERSATIONS, tmp_path), maxdpo_pairs(tokenizer, CONVERSATIONS)[0])
