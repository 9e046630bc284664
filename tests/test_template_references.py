"""The built-in chat templates against their models' own references, token for token, whitespace included.

mistral: mistral-common's v1 instruct tokenizer with Mixtral-8x7B-Instruct's SentencePiece model (which
mistral-common ships), our template's text tokenised by that model as a Hugging Face tokenizer (legacy,
as Mixtral's tokenizer_config.json sets it). llama3: Meta-Llama-3-Instruct's HF template (its Jinja text,
below) and Meta's llama-models ChatFormat with the Llama 3 tiktoken model it ships; the HF template trims
message content and Meta's code does not, so they agree wherever content has no surrounding whitespace, and
we follow the HF template. gemma: Gemma-it's HF template (its Jinja text, below). vicuna: FastChat's
vicuna_v1.1 conversation template."""
from __future__ import annotations

import jinja2
import pytest
from transformers import AutoTokenizer

from maxdpo.data.templates import BUILTIN_TEMPLATES, ChatRenderer
from mixtral_tokenizer import mixtral_v1_tokenizer

# Conversations that end on an assistant turn; whitespace at the edges and inside, several turns, a system.
# No runs of spaces: Hugging Face's converted SentencePiece tokenizers split those differently from
# sentencepiece itself (a tokenizer difference that no template can undo).
CONVERSATIONS = [
    [{"role": "user", "content": "\nWas ist 1+1?\n"}, {"role": "assistant", "content": "Zwei.\n"}],
    [{"role": "system", "content": "Du bist ein hilfreicher Assistent.\n"}, {"role": "user", "content": "Hallo"},
     {"role": "assistant", "content": "Hi! "}, {"role": "user", "content": "Noch einmal,\n\nbitte?"},
     {"role": "assistant", "content": "Ja:\n- eins\n- zwei"}],
    [{"role": "user", "content": "[INST] im Text\n"}, {"role": "assistant", "content": "\n\nist Text "}],
]
PLAIN_CONVERSATIONS = [  # no whitespace at any content's edges: where Meta's and the HF Llama 3 rules agree
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!\n\nHow can I help?"}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue"}],
]
LLAMA3_HF_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's tokenizer_config.json
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA_HF_TEMPLATE = (  # gemma-7b-it's tokenizer_config.json
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


def rendered(tokenizer, name: str, conversation: list[dict]) -> tuple[str, str]:
    """(prompt with the generation prompt, whole conversation) as maxdpo renders them."""
    return ChatRenderer(tokenizer, BUILTIN_TEMPLATES[name])(conversation[:-1], conversation[-1:])


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return mixtral_v1_tokenizer(tmp_path_factory.mktemp("mixtral"))


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_mistral_template_tokens_equal_mistral_commons(mixtral, conversation):
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    reference = MistralTokenizer.v1().instruct_tokenizer
    system = next((m["content"] for m in conversation if m["role"] == "system"), None)
    turns = [(UserMessage if m["role"] == "user" else AssistantMessage)(content=m["content"])
             for m in conversation if m["role"] != "system"]
    whole = reference.encode_instruct(InstructRequest(messages=turns, system_prompt=system)).tokens
    prompt = reference.encode_instruct(InstructRequest(messages=turns[:-1], system_prompt=system)).tokens
    prompt_text, whole_text = rendered(mixtral["tokenizer"], "mistral", conversation)
    assert mixtral["tokenizer"](whole_text, add_special_tokens=False)["input_ids"] == whole
    assert mixtral["tokenizer"](prompt_text, add_special_tokens=False)["input_ids"] == prompt


def test_the_issues_example_keeps_its_newlines(mixtral):
    """A user turn "\\nWas ist 1+1?\\n" answered "Zwei.\\n": 23 tokens, as mistral-common (trimming gave 19)."""
    _, whole_text = rendered(mixtral["tokenizer"], "mistral", CONVERSATIONS[0])
    assert len(mixtral["tokenizer"](whole_text, add_special_tokens=False)["input_ids"]) == 23


def _llama3_reference():
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    tokenizer = Tokenizer.get_instance()
    chat = ChatFormat(tokenizer)

    def encode(conversation: list[dict], generation_prompt: bool) -> list[int]:
        tokens = [tokenizer.special_tokens["<|begin_of_text|>"]]
        for message in conversation:
            raw = RawMessage(role=message["role"], content=message["content"], stop_reason=StopReason.end_of_turn)
            tokens += chat.encode_message(raw, tool_prompt_format=None)[0]
        return tokens + (chat._encode_header("assistant") if generation_prompt else [])

    def tokenize(text: str) -> list[int]:
        return tokenizer.encode(text, bos=False, eos=False, allowed_special="all")

    return encode, tokenize


class _Specials:
    """Renders with a model's own BOS/EOS strings (the template text is all that differs between tokenizers)."""

    def __init__(self, tokenizer, bos: str, eos: str):
        self.tokenizer, self.bos, self.eos = tokenizer, bos, eos

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, bos_token=self.bos, eos_token=self.eos, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    from maxdpo.data.sources import resolve_path
    return AutoTokenizer.from_pretrained(resolve_path("bundled:tiny/tokenizer"))


def _hf_render(template: str, conversation: list[dict], generation_prompt: bool, bos: str, eos: str) -> str:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    return environment.from_string(template).render(messages=conversation, add_generation_prompt=generation_prompt,
                                                    bos_token=bos, eos_token=eos, raise_exception=raise_exception)


@pytest.mark.parametrize("conversation", CONVERSATIONS + PLAIN_CONVERSATIONS)
def test_llama3_template_is_metas_hf_template(tiny, conversation):
    llama = _Specials(tiny, "<|begin_of_text|>", "<|end_of_text|>")
    prompt_text, whole_text = rendered(llama, "llama3", conversation)
    assert whole_text == _hf_render(LLAMA3_HF_TEMPLATE, conversation, False, llama.bos, llama.eos)
    assert prompt_text == _hf_render(LLAMA3_HF_TEMPLATE, conversation[:-1], True, llama.bos, llama.eos)


@pytest.mark.parametrize("conversation", PLAIN_CONVERSATIONS)
def test_llama3_template_tokens_equal_metas_chat_format(tiny, conversation):
    encode, tokenize = _llama3_reference()
    prompt_text, whole_text = rendered(_Specials(tiny, "<|begin_of_text|>", "<|end_of_text|>"), "llama3", conversation)
    assert tokenize(whole_text) == encode(conversation, generation_prompt=False)
    assert tokenize(prompt_text) == encode(conversation[:-1], generation_prompt=True)


def test_llama3_trims_where_metas_code_does_not(tiny):
    """The one known disagreement, kept on the HF side: content whitespace at the edges."""
    encode, tokenize = _llama3_reference()
    conversation = CONVERSATIONS[0]
    _, whole_text = rendered(_Specials(tiny, "<|begin_of_text|>", "<|end_of_text|>"), "llama3", conversation)
    assert "\n\nWas ist 1+1?<|eot_id|>" in whole_text
    assert tokenize(whole_text) != encode(conversation, generation_prompt=False)


@pytest.mark.parametrize("conversation", [c for c in CONVERSATIONS + PLAIN_CONVERSATIONS
                                          if c[0]["role"] != "system"])
def test_gemma_template_is_gemmas_hf_template(tiny, conversation):
    gemma = _Specials(tiny, "<bos>", "<eos>")
    prompt_text, whole_text = rendered(gemma, "gemma", conversation)
    assert whole_text == _hf_render(GEMMA_HF_TEMPLATE, conversation, False, gemma.bos, gemma.eos)
    assert prompt_text == _hf_render(GEMMA_HF_TEMPLATE, conversation[:-1], True, gemma.bos, gemma.eos)


def _fastchat_vicuna(conversation: list[dict], generation_prompt: bool) -> str:
    from fastchat.conversation import get_conv_template

    chat = get_conv_template("vicuna_v1.1")
    for message in conversation:
        if message["role"] == "system":
            chat.set_system_message(message["content"])
        else:
            chat.append_message(chat.roles[message["role"] == "assistant"], message["content"])
    if generation_prompt:
        chat.append_message(chat.roles[1], None)
    return chat.get_prompt()


@pytest.mark.parametrize("conversation", CONVERSATIONS + PLAIN_CONVERSATIONS)
def test_vicuna_template_is_fastchats_vicuna_v1_1(tiny, conversation):
    """FastChat's prompt text (its default system message where the conversation has none), after the BOS its
    tokenizer call adds."""
    vicuna = _Specials(tiny, "<s>", "</s>")  # FastChat writes the Llama tokenizer's "</s>" between turns
    prompt_text, whole_text = rendered(vicuna, "vicuna", conversation)
    assert whole_text == "<s>" + _fastchat_vicuna(conversation, generation_prompt=False)
    assert prompt_text == "<s>" + _fastchat_vicuna(conversation[:-1], generation_prompt=True)
