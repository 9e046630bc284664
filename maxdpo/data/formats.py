"""Preference rows in the shapes users bring, normalised to one `Example` per row.

Shapes, detected per dataset from its first row (or forced by `data.format`):
  plain           prompt / chosen / rejected strings. Without a prompt column the prompt is the text
                  chosen and rejected share (TRL's implicit prompt, e.g. Anthropic HH).
  conversational  chosen / rejected are lists of {role, content} messages. The prompt is the prompt column
                  (a message list, or a string taken as one user message) when chosen is a completion
                  only; otherwise it is the messages chosen and rejected share (implicit prompt, e.g.
                  ultrafeedback_binarized, whose chosen holds the whole conversation). Multi-turn
                  histories work either way.
Columns: `data.columns` renames prompt/chosen/rejected; datasets shaped like
argilla/distilabel-math-preference-dpo (instruction, chosen_response, rejected_response) map themselves.

SFT data (`dpo.loss: sft`) needs no rejected column: prompt / completion rows (TRL's prompt-completion
shape; `data.columns.chosen` names the completion, `completion` is tried next), `messages` conversations
(the prompt is everything before the last assistant turn) or preference rows, whose chosen side is used.

Unpaired losses (KTO, BCO) take TRL's unpaired preference rows: prompt / completion / label (true or 1:
desirable), plain or conversational (`data.columns.completion`, `data.columns.label`), or preference rows,
each of which becomes a desirable (chosen) and an undesirable (rejected) example.
"""
from __future__ import annotations

import dataclasses
from typing import Union

from maxdpo.data.sources import DataError

ROLES = ("system", "user", "assistant")
# Column names of known preference datasets, tried when the configured names are absent.
KNOWN_COLUMN_SETS = (("instruction", "chosen_response", "rejected_response"),)

Messages = list[dict]


class InvalidRow(ValueError):
    """This row cannot become a preference pair; the message says why (the caller adds file and row)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One preference pair: text (plain) or message lists (conversational); SFT examples have no rejected."""
    prompt: Union[str, Messages]
    chosen: Union[str, Messages]
    rejected: Union[str, Messages, None]

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclasses.dataclass(frozen=True)
class RowFormat:
    kind: str  # plain | conversational
    prompt: str | None  # column names; prompt None: implicit prompt
    chosen: str
    rejected: str | None  # None: SFT rows (prompt and completion)
    label: str | None = None  # unpaired rows: the label column (chosen then names the completion)


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _sft_format(column_names: list[str], first_row: dict, columns, forced: str, source: str) -> RowFormat:
    completion = next((n for n in (columns.chosen, "completion", "messages") if n in column_names), None)
    if completion is None:
        raise DataError(f"{source}: SFT data needs a completion column ('{columns.chosen}' (data.columns.chosen), "
                        f"'completion' or 'messages'); found {column_names}")
    kind = forced if forced != "auto" else "conversational" if _is_messages(first_row.get(completion)) else "plain"
    prompt = columns.prompt if columns.prompt in column_names else None
    if prompt is None and kind == "plain":
        raise DataError(f"{source}: plain SFT rows need a prompt column '{columns.prompt}'; found {column_names}")
    return RowFormat(kind, prompt, completion, None)


def _unpaired_format(column_names: list[str], first_row: dict, columns, forced: str, source: str) -> RowFormat:
    missing = [name for name in (columns.prompt, columns.completion) if name not in column_names]
    if missing:
        raise DataError(f"{source}: unpaired rows need columns {missing} beside '{columns.label}' (see "
                        f"data.columns); found {column_names}")
    kind = (forced if forced != "auto" else
            "conversational" if _is_messages(first_row.get(columns.completion)) else "plain")
    return RowFormat(kind, columns.prompt, columns.completion, None, columns.label)


def detect_format(features: dict, first_row: dict, columns, forced: str, source: str, sft: bool = False,
                  unpaired: bool = False) -> RowFormat:
    """Picks the column names (configured, else a known set) and the kind of rows from the dataset's features;
    with `unpaired`, rows with a label column are unpaired rows, others preference pairs."""
    column_names = list(features)
    if sft:
        return _sft_format(column_names, first_row, columns, forced, source)
    if unpaired and columns.label in column_names:
        return _unpaired_format(column_names, first_row, columns, forced, source)
    names = (columns.prompt, columns.chosen, columns.rejected)
    if names[1] not in column_names or names[2] not in column_names:
        known = next((k for k in KNOWN_COLUMN_SETS if set(k) <= set(column_names)), None)
        if known is None:
            missing = [n for n in names[1:] if n not in column_names]
            raise DataError(f"{source}: missing column(s) {missing}; found {column_names} (see data.columns)")
        names = known
    prompt = names[0] if names[0] in column_names else None
    for name in (prompt, *names[1:]):
        if name is not None and type(features[name]).__name__ == "Json":
            raise DataError(f"{source}: column '{name}' mixes value types across rows (e.g. strings and lists or "
                            "numbers), which datasets cannot load faithfully; make every row's value the same type")
    if forced != "auto":
        kind = forced
    else:
        kind = "conversational" if _is_messages(first_row.get(names[1])) else "plain"
    return RowFormat(kind, prompt, names[1], names[2])


def _check_text(value, what: str) -> str:
    if value is None:
        raise InvalidRow(f"{what} is missing")
    if not isinstance(value, str):
        raise InvalidRow(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRow(f"{what} is empty")
    return value


def _check_messages(value, what: str) -> Messages:
    if value is None:
        raise InvalidRow(f"{what} is missing")
    if not isinstance(value, list) or not value:
        raise InvalidRow(f"{what} must be a non-empty list of {{role, content}} messages, got {type(value).__name__}")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidRow(f"{what} message {index} must be a mapping with a role in {list(ROLES)}, got {message!r}")
        content = _check_text(message.get("content"), f"{what} message {index} content")
        messages.append({"role": message["role"], "content": content})
    return messages


def _shared_prefix_length(chosen, rejected) -> int:
    count = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        count += 1
    return count


def _plain_example(row: dict, fmt: RowFormat) -> Example:
    chosen = _check_text(row.get(fmt.chosen), f"'{fmt.chosen}'")
    rejected = _check_text(row.get(fmt.rejected), f"'{fmt.rejected}'")
    if fmt.prompt is not None:
        return Example(_check_text(row.get(fmt.prompt), f"'{fmt.prompt}'"), chosen, rejected)
    split = _shared_prefix_length(chosen, rejected)
    if split and split < min(len(chosen), len(rejected)) and chosen[split - 1] == " ":
        split -= 1  # the completion starts with the space, as TRL splits it
    prompt, chosen, rejected = chosen[:split], chosen[split:], rejected[split:]
    if not prompt.strip():
        raise InvalidRow(f"no prompt column and '{fmt.chosen}' / '{fmt.rejected}' share no leading text")
    if not chosen.strip() or not rejected.strip():
        raise InvalidRow(f"'{fmt.chosen}' or '{fmt.rejected}' has no text beyond the shared prompt")
    return Example(prompt, chosen, rejected)


def _conversational_example(row: dict, fmt: RowFormat) -> Example:
    chosen = _check_messages(row.get(fmt.chosen), f"'{fmt.chosen}'")
    rejected = _check_messages(row.get(fmt.rejected), f"'{fmt.rejected}'")
    prompt_value = row.get(fmt.prompt) if fmt.prompt is not None else None
    if isinstance(prompt_value, list):
        prompt = _check_messages(prompt_value, f"'{fmt.prompt}'")
        if chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]  # completions repeating the prompt
    elif chosen[0]["role"] == "assistant":  # completion-only messages with a text prompt
        prompt = [{"role": "user", "content": _check_text(prompt_value, f"'{fmt.prompt or 'prompt'}'")}]
    else:  # whole conversations: the prompt is what they share
        split = _shared_prefix_length(chosen, rejected)
        prompt, chosen, rejected = chosen[:split], chosen[split:], rejected[split:]
        if not prompt:
            raise InvalidRow(f"'{fmt.chosen}' and '{fmt.rejected}' share no leading messages to serve as the prompt")
    for what, completion in ((fmt.chosen, chosen), (fmt.rejected, rejected)):
        if not completion:
            raise InvalidRow(f"'{what}' has no messages beyond the prompt")
        if completion[-1]["role"] != "assistant":
            raise InvalidRow(f"'{what}' must end with an assistant message, ends with '{completion[-1]['role']}'")
    if prompt[-1]["role"] == "assistant":
        raise InvalidRow("the prompt ends with an assistant message; it must end with a user turn")
    return Example(prompt, chosen, rejected)


def _sft_example(row: dict, fmt: RowFormat) -> Example:
    if fmt.kind == "plain":
        return Example(_check_text(row.get(fmt.prompt), f"'{fmt.prompt}'"),
                       _check_text(row.get(fmt.chosen), f"'{fmt.chosen}'"), None)
    completion = _check_messages(row.get(fmt.chosen), f"'{fmt.chosen}'")
    prompt_value = row.get(fmt.prompt) if fmt.prompt is not None else None
    if prompt_value is not None:  # a prompt column beside completion messages
        prompt = (_check_messages(prompt_value, f"'{fmt.prompt}'") if isinstance(prompt_value, list)
                  else [{"role": "user", "content": _check_text(prompt_value, f"'{fmt.prompt}'")}])
        if completion[:len(prompt)] == prompt:
            completion = completion[len(prompt):]
    else:  # one whole conversation: the last assistant turn is the completion
        last = max((i for i, m in enumerate(completion) if m["role"] == "assistant"), default=None)
        if last is None:
            raise InvalidRow(f"'{fmt.chosen}' has no assistant message to train on")
        prompt, completion = completion[:last], completion[last:last + 1]
    if not prompt or prompt[-1]["role"] == "assistant":
        raise InvalidRow("the prompt must end with a user turn")
    if not completion or completion[-1]["role"] != "assistant":
        raise InvalidRow(f"'{fmt.chosen}' must end with an assistant message")
    return Example(prompt, completion, None)


def to_example(row: dict, fmt: RowFormat) -> Example:
    """The row as an Example; raises InvalidRow (missing, empty or ill-typed fields, chosen == rejected)."""
    if fmt.rejected is None:
        return _sft_example(row, fmt)
    example = _conversational_example(row, fmt) if fmt.kind == "conversational" else _plain_example(row, fmt)
    if example.chosen == example.rejected:
        raise InvalidRow("chosen and rejected are identical")
    return example


def _label(value, column: str) -> int:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return int(value)
    raise InvalidRow(f"'{column}' must be true or false (or 1 or 0), got {value!r}")


def to_unpaired_examples(row: dict, fmt: RowFormat) -> list[tuple[Example, int]]:
    """The row's (single-completion example, label) list: one for an unpaired row, the chosen (1) and the
    rejected (0) completion of a preference row (TRL's unpair_preference_dataset)."""
    if fmt.label is not None:
        return [(_sft_example(row, fmt), _label(row.get(fmt.label), fmt.label))]
    pair = to_example(row, fmt)
    return [(Example(pair.prompt, pair.chosen, None), 1), (Example(pair.prompt, pair.rejected, None), 0)]


def as_conversation(example: Example) -> Example:
    """A plain example as one user turn and one assistant turn (for a chat template on plain data)."""
    if example.conversational:
        return example
    rejected = None if example.rejected is None else [{"role": "assistant", "content": example.rejected}]
    return Example([{"role": "user", "content": example.prompt}],
                   [{"role": "assistant", "content": example.chosen}], rejected)
