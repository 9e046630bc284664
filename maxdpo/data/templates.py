"""Chat templates: the tokenizer's own, a built-in by name, or any Jinja template (a string or a .jinja file).

Templates are rendered by transformers' `apply_chat_template`, so a built-in behaves exactly like the same
Jinja text shipped in a tokenizer_config.json (`bos_token`, `eos_token`, `raise_exception` available).
A pair renders as TRL renders it: the prompt with the generation prompt appended, and each completion as
the text the whole conversation adds beyond the prompt.

Built-ins (system messages: native in llama3, chatml and vicuna; mistral and gemma have no system role,
so the system text opens the first user turn, followed by a blank line):
  llama3   <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nQ<|eot_id|><|start_header_id|>assistant...
  mistral  <s>[INST] Q [/INST] A</s>[INST] Q2 [/INST]          (Mistral / Mixtral Instruct)
  gemma    <bos><start_of_turn>user\\nQ<end_of_turn>\\n<start_of_turn>model\\nA<end_of_turn>\\n
  vicuna   SYSTEM USER: Q ASSISTANT: A</s>USER: Q2 ASSISTANT:   (FastChat v1.1, EOS between turns)
  chatml   <|im_start|>user\\nQ<|im_end|>\\n<|im_start|>assistant\\nA<|im_end|>\\n
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

ALTERNATE = ("{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
             "{{ raise_exception('conversation roles must alternate user/assistant/user/...') }}{%- endif -%}")
SPLIT_SYSTEM = ("{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] | trim -%}"
                "{%- set messages = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- endif -%}")
FIRST_USER_CONTENT = ("{%- set content = message['content'] | trim -%}"
                      "{%- if loop.first and system -%}{%- set content = system + '\\n\\n' + content -%}{%- endif -%}")

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
        "{%- for message in messages -%}" + ALTERNATE + FIRST_USER_CONTENT +
        "{%- if message['role'] == 'user' -%}{{ '[INST] ' + content + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + content + eos_token }}{%- endif -%}"
        "{%- endfor -%}"),
    "gemma": (
        "{{ bos_token }}" + SPLIT_SYSTEM +
        "{%- for message in messages -%}" + ALTERNATE + FIRST_USER_CONTENT +
        "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
        "{{ '<start_of_turn>' + role + '\\n' + content + '<end_of_turn>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"),
    "vicuna": (
        SPLIT_SYSTEM +
        "{%- if system -%}{{ system + ' ' }}{%- endif -%}"
        "{%- for message in messages -%}" + ALTERNATE +
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] | trim + ' ' }}"
        "{%- else -%}{{ 'ASSISTANT: ' + message['content'] | trim + eos_token }}{%- endif -%}"
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
    """Renders (prompt messages, completion messages) to (prompt text, completion text)."""

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

    def __call__(self, prompt: list[dict], completion: list[dict]) -> tuple[str, str]:
        if self.system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": self.system_prompt}] + prompt
        prompt_text = self._render(prompt, add_generation_prompt=True)
        full_text = self._render(prompt + completion, add_generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise TemplateError("the chat template renders the prompt differently inside the whole conversation "
                                f"({prompt_text[-40:]!r} is not a prefix of it)")
        return prompt_text, full_text[len(prompt_text):]
