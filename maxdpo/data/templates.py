"""Chat templates: the tokenizer's own, a built-in by name, or any Jinja template (a string or a .jinja file).

Templates are rendered by transformers' `apply_chat_template`, so a built-in behaves exactly like the same
Jinja text shipped in a tokenizer_config.json (`bos_token`, `eos_token`, `raise_exception` available).
A pair renders as TRL renders it: the prompt with the generation prompt appended, and each whole
conversation (prompt + completion); tokenize.py finds where they part.

Built-ins, each checked against its model's reference (tests/test_template_references.py):
  llama3   <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nQ<|eot_id|><|start_header_id|>assistant...
           Meta-Llama-3-Instruct's HF template: content trimmed (Meta's llama-models ChatFormat does not trim)
  mistral  <s>[INST] Q [/INST] A</s>[INST] Q2 [/INST]          mistral-common's v1 instruct tokenizer
           (Mistral / Mixtral Instruct): content verbatim, whitespace and newlines kept
  gemma    <bos><start_of_turn>user\\nQ<end_of_turn>\\n<start_of_turn>model\\nA<end_of_turn>\\n
           Gemma-it's HF template: content trimmed
  vicuna   <s>SYSTEM USER: Q ASSISTANT: A</s>USER: Q2 ASSISTANT:   FastChat's vicuna_v1.1 (content verbatim, its
           default system message when there is none), with the BOS that FastChat's tokenizer call adds
  chatml   <|im_start|>user\\nQ<|im_end|>\\n<|im_start|>assistant\\nA<|im_end|>\\n   (content verbatim)
System messages: native in llama3, chatml and vicuna; mistral and gemma have no system role, so the system
text opens the first user turn, followed by a blank line (mistral-common's rule).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

ALTERNATE = ("{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
             "{{ raise_exception('conversation roles must alternate user/assistant/user/...') }}{%- endif -%}")
SPLIT_SYSTEM = ("{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
                "{%- set messages = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- endif -%}")


def first_user_content(trim: bool) -> str:
    """Sets `content`: the message's (trimmed or verbatim), the system text and a blank line first on turn one."""
    content = "message['content'] | trim" if trim else "message['content']"
    system = "system | trim" if trim else "system"
    return (f"{{%- set content = {content} -%}}"
            f"{{%- if loop.first and system -%}}{{%- set content = {system} + '\\n\\n' + content -%}}{{%- endif -%}}")


VICUNA_DEFAULT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                         "helpful, detailed, and polite answers to the user's questions.")
BUILTIN_TEMPLATES = {
    "llama3": (
        "{%- for message in messages -%}"
        "{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] | trim + '<|eot_id|>' -%}"
        "{%- if loop.index0 == 0 -%}{%- set content = bos_token + content -%}{%- endif -%}"
        "{{ content }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"),
    "mistral": (
        "{{ bos_token }}" + SPLIT_SYSTEM +
        "{%- for message in messages -%}" + ALTERNATE + first_user_content(trim=False) +
        "{%- if message['role'] == 'user' -%}{{ '[INST] ' + content + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + content + eos_token }}{%- endif -%}"
        "{%- endfor -%}"),
    "gemma": (
        "{{ bos_token }}" + SPLIT_SYSTEM +
        "{%- for message in messages -%}" + ALTERNATE + first_user_content(trim=True) +
        "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
        "{{ '<start_of_turn>' + role + '\\n' + content + '<end_of_turn>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"),
    "vicuna": (
        "{{ bos_token }}" + SPLIT_SYSTEM +
        "{{ (system or \"" + VICUNA_DEFAULT_SYSTEM + "\") + ' ' }}"
        "{%- for message in messages -%}" + ALTERNATE +
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ' }}"
        "{%- else -%}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"),
    "chatml": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"),
}


class TemplateError(ValueError):
    """A conversation the template cannot render; the caller names the row."""


def resolve_template(setting: str, tokenizer) -> Optional[str]:
    """The Jinja text for `data.chat_template`: None for `auto` with a tokenizer that has no template."""
    if setting == "auto":
        return tokenizer.chat_template
    if setting in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[setting]
    if setting.endswith(".jinja"):
        path = Path(setting)
        if not path.is_file():
            raise FileNotFoundError(f"data.chat_template file not found: {path}")
        return path.read_text()
    return setting


class ChatRenderer:
    """Renders (prompt messages, completion messages) to (prompt text, whole conversation text)."""

    def __init__(self, tokenizer, template: str, system_prompt: Optional[str] = None):
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja's raise_exception and template errors alike
            raise TemplateError(f"the chat template cannot render this conversation: {err}") from err

    def _with_system(self, prompt: list[dict]) -> list[dict]:
        if self.system_prompt and prompt[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}] + prompt
        return prompt

    def prompt_text(self, prompt: list[dict]) -> str:
        """The prompt rendered up to the start of the assistant's turn (what sampling continues)."""
        return self._render(self._with_system(prompt), add_generation_prompt=True)

    def __call__(self, prompt: list[dict], completion: list[dict]) -> tuple[str, str]:
        prompt = self._with_system(prompt)
        return (self._render(prompt, add_generation_prompt=True),
                self._render(prompt + completion, add_generation_prompt=False))
