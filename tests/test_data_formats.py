"""Data formats, sources and chat templates on the committed fixtures (tests/data, see make_fixtures.py)."""
import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from maxdpo.config import ColumnsConfig, DataConfig
from maxdpo.data.formats import InvalidRow, RowFormat, detect_format, to_example
from maxdpo.data.pipeline import prepare_pairs
from maxdpo.data.sources import DataError, load_rows
from maxdpo.data.templates import BUILTIN_TEMPLATES, ChatRenderer, TemplateError

DATA = Path(__file__).parent / "data"
FORMATS = DATA / "formats"
GERMAN_SYSTEM = "Du bist ein freundlicher und hilfreicher deutscher KI-Assistent."


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DATA / "chat_tokenizer")


def _prepare(tokenizer, source, split="train", **data):
    cfg = DataConfig(**{"max_length": 128, "max_prompt_length": 64, "cache": False, **data})
    return prepare_pairs(str(source), split, cfg, tokenizer, show_progress=False)


def _decoded(tokenizer, store, index=0):
    pair = store.pair(index)
    return (tokenizer.decode(pair.chosen[:pair.chosen_prompt_len]), tokenizer.decode(pair.chosen[pair.chosen_prompt_len:]),
            tokenizer.decode(pair.rejected[pair.rejected_prompt_len:]))


# -- sources ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source,split,rows", [
    ("plain.jsonl", "train", 8), ("ultrafeedback_cleaned.json", "train", 8), ("distilabel_math.jsonl", "train", 8),
    ("multiturn.arrow", "train", 8), ("ultrafeedback_binarized", "train_prefs", 6),
    ("ultrafeedback_binarized", "test_prefs", 2), ("hh_saved", "train", 6), ("hh_saved", "test", 2)])
def test_every_source_kind_loads(source, split, rows):
    assert len(load_rows(str(FORMATS / source), split)) == rows


def test_parquet_file_loads(tmp_path):
    path = tmp_path / "prefs.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}]).to_parquet(path)
    assert load_rows(str(path))[0] == {"prompt": "a", "chosen": " b", "rejected": " c"}


def test_a_hub_name_goes_through_load_dataset_with_the_split(monkeypatch):
    calls, real_load_dataset = [], datasets.load_dataset

    def fake_load_dataset(name, split):  # the hub is unreachable here: serve the hub-shaped fixture folder
        calls.append((name, split))
        return real_load_dataset(str(FORMATS / "ultrafeedback_binarized"), split=split)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows("HuggingFaceH4/ultrafeedback_binarized", "test_prefs")
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", "test_prefs")] and len(rows) == 2


def test_an_unreachable_hub_name_is_a_data_error(monkeypatch):
    def unreachable(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="could not load dataset 'org/missing' \\(split 'train'\\): offline"):
        load_rows("org/missing")


def test_an_unknown_split_lists_the_splits():
    with pytest.raises(DataError, match=r"has no split 'validation'; it has \['test', 'train'\]"):
        load_rows(str(FORMATS / "hh_saved"), "validation")


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet"])
def test_missing_file_is_named(tmp_path, name):
    with pytest.raises(DataError, match=f"data file not found: .*{name}"):
        load_rows(str(tmp_path / name))


def test_malformed_file_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": \n')
    with pytest.raises(DataError, match="could not read .*broken.jsonl as json"):
        load_rows(str(path))


# -- formats ------------------------------------------------------------------------------------------------
def test_plain_rows_stay_untemplated_under_auto(tokenizer):
    prepared = _prepare(tokenizer, FORMATS / "plain.jsonl")
    assert _decoded(tokenizer, prepared.store) == ("What is 2 + 3?", " 2 + 3 = 5.</s>", " 2 + 3 = 6.</s>")


def test_ultrafeedback_binarized_takes_the_prompt_from_the_shared_messages(tokenizer):
    """prompt is a string, chosen/rejected whole conversations: TRL extracts the shared user turn."""
    prepared = _prepare(tokenizer, FORMATS / "ultrafeedback_binarized", "train_prefs", chat_template="chatml")
    assert _decoded(tokenizer, prepared.store) == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
        "2 + 3 = 5.<|im_end|>\n", "2 + 3 = 6.<|im_end|>\n")  # as TRL: the template's tokens only


def test_auto_uses_the_tokenizers_own_template(tokenizer):
    auto = _prepare(tokenizer, FORMATS / "ultrafeedback_cleaned.json")
    named = _prepare(tokenizer, FORMATS / "ultrafeedback_cleaned.json", chat_template="chatml")
    assert (auto.store.tokens == named.store.tokens).all()


def test_distilabel_columns_map_themselves_and_a_template_wraps_plain_text(tokenizer):
    prepared = _prepare(tokenizer, FORMATS / "distilabel_math.jsonl", chat_template="mistral")
    assert _decoded(tokenizer, prepared.store) == ("<s>[INST] What is 2 + 3? [/INST]", " 2 + 3 = 5.</s>",
                                                   " 2 + 3 = 6.</s>")


def test_multi_turn_prompt_messages(tokenizer):
    prepared = _prepare(tokenizer, FORMATS / "multiturn.arrow", chat_template="gemma")
    assert _decoded(tokenizer, prepared.store)[0] == (
        "<s><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\nHello. How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n")


def test_implicit_text_prompt_splits_like_trl(tokenizer):
    prepared = _prepare(tokenizer, FORMATS / "hh_saved", "test")
    assert _decoded(tokenizer, prepared.store) == (
        "\n\nHuman: What comes after Monday?\n\nAssistant:", " Tuesday comes after Monday.</s>",
        " Sunday comes after Monday.</s>")


def test_columns_rename(tokenizer, tmp_path):
    path = tmp_path / "renamed.jsonl"
    path.write_text(json.dumps({"question": "What is 2 + 3?", "good": " 5", "bad": " 6"}) + "\n")
    prepared = _prepare(tokenizer, path, columns=ColumnsConfig("question", "good", "bad"))
    assert _decoded(tokenizer, prepared.store) == ("What is 2 + 3?", " 5</s>", " 6</s>")


def test_missing_columns_are_named(tokenizer, tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"question": "q", "good": " a", "bad": " b"}) + "\n")
    with pytest.raises(DataError, match=r"odd.jsonl: missing column\(s\) \['chosen', 'rejected'\]; found"):
        _prepare(tokenizer, path)


def test_conversations_without_a_template_are_refused(tmp_path):
    plain_tokenizer = AutoTokenizer.from_pretrained(DATA / "chat_tokenizer")
    plain_tokenizer.chat_template = None
    with pytest.raises(DataError, match="holds conversations but data.chat_template is 'auto'"):
        _prepare(plain_tokenizer, FORMATS / "ultrafeedback_cleaned.json")


PLAIN = RowFormat("plain", "prompt", "chosen", "rejected")
CHAT = RowFormat("conversational", "prompt", "chosen", "rejected")
USER, BOT = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})


@pytest.mark.parametrize("fmt,row,reason", [
    (PLAIN, {"prompt": "q", "rejected": " b"}, "'chosen' is missing"),
    (PLAIN, {"prompt": " ", "chosen": " a", "rejected": " b"}, "'prompt' is empty"),
    (PLAIN, {"prompt": "q", "chosen": 3, "rejected": " b"}, "'chosen' must be a string, got int"),
    (PLAIN, {"prompt": "q", "chosen": " a", "rejected": " a"}, "chosen and rejected are identical"),
    (RowFormat("plain", None, "chosen", "rejected"), {"chosen": "x a", "rejected": "y b"}, "share no leading text"),
    (CHAT, {"prompt": [USER], "chosen": [BOT], "rejected": [{"role": "assistant", "content": 7}]},
     "'rejected' message 0 content must be a string, got int"),
    (CHAT, {"prompt": [USER], "chosen": [BOT], "rejected": [{"role": "robot", "content": "b"}]},
     "'rejected' message 0 must be a mapping with a role"),
    (CHAT, {"prompt": [USER], "chosen": [BOT], "rejected": []}, "'rejected' must be a non-empty list"),
    (CHAT, {"prompt": [USER], "chosen": [BOT], "rejected": [BOT]}, "chosen and rejected are identical"),
    (CHAT, {"prompt": [USER], "chosen": [BOT], "rejected": [USER]}, "'rejected' must end with an assistant message"),
    (CHAT, {"prompt": None, "chosen": [USER, BOT], "rejected": [{"role": "user", "content": "r"}, BOT]},
     "share no leading messages"),
])
def test_bad_rows_say_why(fmt, row, reason):
    with pytest.raises(InvalidRow, match=reason):
        to_example(row, fmt)


def test_completion_lists_repeating_the_prompt_are_stripped():
    example = to_example({"prompt": [USER], "chosen": [USER, BOT], "rejected": [USER, {**BOT, "content": "b"}]}, CHAT)
    assert example.prompt == [USER] and example.chosen == [BOT]


def test_detect_format_forced_and_auto():
    columns, string = ColumnsConfig(), datasets.Value("string")
    features = {"prompt": string, "chosen": string, "rejected": string}
    assert detect_format(features, {"chosen": [USER]}, columns, "auto", "s").kind == "conversational"
    assert detect_format({"chosen": string, "rejected": string}, {"chosen": "x"}, columns, "auto", "s") == RowFormat(
        "plain", None, "chosen", "rejected")
    assert detect_format(features, {"chosen": "x"}, columns, "conversational", "s").kind == "conversational"


# -- chat templates -----------------------------------------------------------------------------------------
def _render(tokenizer, name, prompt, completion, system=None):
    return ChatRenderer(tokenizer, BUILTIN_TEMPLATES[name], system)(prompt, completion)


class _Specials:
    """A stand-in tokenizer whose BOS/EOS are the hub models' own strings (transformers' renderer)."""

    def __init__(self, tokenizer, bos, eos):
        self.tokenizer, self.bos, self.eos = tokenizer, bos, eos

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, bos_token=self.bos, eos_token=self.eos, **kwargs)


def test_llama3_with_the_german_system_prompt_matches_the_seed_card(tokenizer):
    """Llama-3-SauerkrautLM card: the German system prompt rendering, byte for byte."""
    renderer = ChatRenderer(_Specials(tokenizer, "<|begin_of_text|>", "<|end_of_text|>"), BUILTIN_TEMPLATES["llama3"],
                            GERMAN_SYSTEM)
    prompt, full = renderer([{"role": "user", "content": "Input"}], [{"role": "assistant", "content": "Ja."}])
    assert prompt == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + GERMAN_SYSTEM +
                      "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nInput<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert full == prompt + "Ja.<|eot_id|>"


def test_vicuna_matches_the_gemma_seed_card(tokenizer):
    renderer = ChatRenderer(_Specials(tokenizer, "<bos>", "<eos>"), BUILTIN_TEMPLATES["vicuna"],
                            "You are a helpful AI Assistant.")
    prompt, full = renderer([{"role": "user", "content": "Hello, how are you?"}],
                                  [{"role": "assistant", "content": "Fine."}])
    assert prompt == "<bos>You are a helpful AI Assistant. USER: Hello, how are you? ASSISTANT:"
    assert full == prompt + " Fine.<eos>"


def test_mistral_matches_the_mixtral_seed_card(tokenizer):
    """SauerkrautLM-Mixtral card: `[INST] Instruction [/INST] Model answer [INST] Follow-up instruction [/INST]`."""
    renderer = ChatRenderer(_Specials(tokenizer, "<s>", "</s>"), BUILTIN_TEMPLATES["mistral"])
    prompt, _ = renderer([{"role": "user", "content": "Instruction"}, {"role": "assistant", "content": "Model answer"},
                          {"role": "user", "content": "Follow-up instruction"}], [{"role": "assistant", "content": "x"}])
    assert prompt == "<s>[INST] Instruction [/INST] Model answer</s>[INST] Follow-up instruction [/INST]"


@pytest.mark.parametrize("name,opening", [("mistral", "<s>[INST] Be brief.\n\nq [/INST]"),
                                          ("gemma", "<s><start_of_turn>user\nBe brief.\n\nq<end_of_turn>\n")])
def test_templates_without_a_system_role_open_the_first_user_turn_with_it(tokenizer, name, opening):
    prompt, _ = _render(tokenizer, name, [USER], [BOT], system="Be brief.")
    assert prompt.startswith(opening)


def test_a_conversations_own_system_message_wins_over_system_prompt(tokenizer):
    system = {"role": "system", "content": "Own."}
    prompt, _ = _render(tokenizer, "chatml", [system, USER], [BOT], system="Default.")
    assert "Own." in prompt and "Default." not in prompt


def test_non_alternating_turns_are_a_template_error(tokenizer):
    with pytest.raises(TemplateError, match="roles must alternate"):
        _render(tokenizer, "gemma", [USER, USER], [BOT])


# Token ids of one fixed conversation (system prompt, two user turns) per built-in template on the fixture
# tokenizer: (prompt ids, chosen completion ids). A change here changes what every model is trained on. The
# templates write every special token (TRL's rule): chatml no BOS, and no EOS after a template's own end.
GOLDEN = {
    "llama3": ([1, 4, 93, 99, 93, 94, 79, 87, 5, 209, 209, 44, 79, 352, 92, 284, 80, 24, 6, 4, 95, 93, 267, 5, 209, 209,
                358, 343, 342, 41, 6, 4, 75, 93, 93, 270, 280, 88, 94, 5, 209, 209, 366, 24, 6, 4, 95, 93, 267, 5, 209,
                209, 324, 274, 273, 308, 310, 41, 6, 4, 75, 93, 93, 270, 280, 88, 94, 5, 209, 209],
               [28, 308, 310, 285, 337, 24, 6]),
    "mistral": ([1, 69, 51, 56, 61, 62, 71, 338, 79, 352, 92, 284, 80, 24, 209, 209, 358, 343, 342, 41, 231, 69, 25, 51,
                 56, 61, 62, 71, 394, 24, 2, 69, 51, 56, 61, 62, 71, 231, 324, 274, 273, 308, 310, 41, 231, 69, 25, 51,
                 56, 61, 62, 71],
                [273, 308, 310, 285, 337, 24, 2]),
    "gemma": ([1, 7, 95, 93, 267, 209, 44, 79, 352, 92, 284, 80, 24, 209, 209, 358, 343, 342, 41, 8, 209, 7, 87, 89, 78,
               335, 209, 366, 24, 8, 209, 7, 95, 93, 267, 209, 324, 274, 273, 308, 310, 41, 8, 209, 7, 87, 89, 78, 335,
               209],
              [28, 308, 310, 285, 337, 24, 8, 209]),
    "vicuna": ([1, 44, 79, 352, 92, 284, 80, 24, 231, 63, 61, 47, 60, 36, 231, 358, 343, 342, 41, 330, 61, 61, 51, 61,
                62, 43, 56, 62, 36, 394, 24, 2, 63, 61, 47, 60, 36, 231, 324, 274, 273, 308, 310, 41, 330, 61, 61, 51,
                61, 62, 43, 56, 62, 36],
               [273, 308, 310, 285, 337, 24, 2]),
    "chatml": ([9, 93, 99, 93, 94, 79, 87, 209, 44, 79, 352, 92, 284, 80, 24, 10, 209, 9, 95, 93, 267, 209, 358, 343,
                342, 41, 10, 209, 9, 75, 93, 93, 270, 280, 88, 94, 209, 366, 24, 10, 209, 9, 95, 93, 267, 209, 324, 274,
                273, 308, 310, 41, 10, 209, 9, 75, 93, 93, 270, 280, 88, 94, 209],
               [28, 308, 310, 285, 337, 24, 10, 209]),
}


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_golden_token_ids(tokenizer, tmp_path, name):
    row = {"prompt": [{"role": "user", "content": "Is water wet?"}, {"role": "assistant", "content": "Yes."},
                      {"role": "user", "content": "What is 2 + 3?"}],
           "chosen": [{"role": "assistant", "content": "2 + 3 = 5."}], "rejected": [{"role": "assistant", "content": "No"}]}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(row) + "\n")
    pair = _prepare(tokenizer, path, chat_template=name, system_prompt="Be brief.").store.pair(0)
    ids = pair.chosen.tolist()
    assert (ids[:pair.chosen_prompt_len], ids[pair.chosen_prompt_len:]) == GOLDEN[name]
    assert ids.count(tokenizer.bos_token_id) == (name != "chatml")  # the template's own BOS, never doubled


def test_jinja_template_from_a_file_and_inline(tokenizer, tmp_path):
    text = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    (tmp_path / "mine.jinja").write_text(text)
    from_file = _prepare(tokenizer, FORMATS / "plain.jsonl", chat_template=str(tmp_path / "mine.jinja"))
    inline = _prepare(tokenizer, FORMATS / "plain.jsonl", chat_template=text)
    assert (from_file.store.tokens == inline.store.tokens).all()
    assert _decoded(tokenizer, inline.store)[:2] == ("<user>What is 2 + 3?<assistant>", " 2 + 3 = 5.")
