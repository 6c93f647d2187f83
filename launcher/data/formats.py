"""Row formats: one row -> text segments that say which parts are targets.

An sft example is a list of ``(text, is_target)`` segments whose concatenation
is the whole training text; the prompt is not a target, the response is (for
chat, every assistant turn). A classification example is ``(text, class id)``;
a preference example is a prompt and two responses, each a segment list. A
prompt example (online RL) is the prompt and its reference answer, the answer
marked as the target, with the row's other fields for the reward functions.

Chat rows are rendered with the tokenizer's chat template (or the built-in one
named by ``data.chat_template``) one prefix at a time, so each turn's text is
exactly what the template adds for it. Field and role names are mapped per
source (``fields``, ``roles``), and every error names the row and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunefleet.launcher.config import CHAT_ROLES, FORMAT_FIELDS, DataConfig, DataSource
from tunefleet.launcher.data.sources import BadRow
from tunefleet.launcher.errors import DataError

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CHAT_TEMPLATES = {
    "chatml": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    "llama3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
}

Segments = list[tuple[str, bool]]


@dataclass(frozen=True)
class Pair:
    """A preference example: the chosen and the rejected response to one prompt."""

    prompt: Segments
    chosen: Segments
    rejected: Segments


@dataclass(frozen=True)
class PromptExample:
    """An online-RL prompt: the prompt then its reference answer (the target), and the row's other fields
    (ids, difficulty, test cases: whatever a reward function reads beside the prompt and the answer)."""

    segments: Segments
    fields: dict[str, Any]


Example = Segments | tuple[str, int] | Pair | PromptExample


def other_fields(row: dict, source: DataSource) -> dict[str, Any]:
    """A prompt row's fields besides its prompt and answer (named through ``source.fields``): what a reward
    function reads beside those two."""
    skip = {source.fields.get(name, name) for name in ("prompt", "answer")}
    return {k: v for k, v in row.items() if k not in skip}


class RowFormatter:
    """Turns rows of one source into examples; picklable, so tokenizing processes can share it."""

    def __init__(self, source: DataSource, cfg: DataConfig, tokenizer):
        self.source = source
        self.format = source.format
        self.names = {field: source.fields.get(field, field) for field in FORMAT_FIELDS[source.format]}
        # How hints name the source; the eval file (data.eval.path) is read like the first source.
        self.key = f"data.sources[{cfg.sources.index(source) if source in cfg.sources else 0}]"
        self.roles = source.roles
        self.tokenizer = tokenizer
        self.template = CHAT_TEMPLATES[cfg.chat_template] if cfg.chat_template else None
        self.eos = tokenizer.eos_token or ""
        self.label_ids = {name: i for i, name in enumerate(cfg.labels or [])}

    def __call__(self, row: Any, where: str) -> Example:
        if not isinstance(row, dict):
            raise BadRow(f"{where}: expected an object with fields, got {type(row).__name__}")
        return getattr(self, f"_{self.format}_row")(row, where)

    # ------------------------------------------------------------------ fields
    def _text(self, row: dict, field: str, where: str, *, required: bool = True) -> str:
        name = self.names[field]
        value = row.get(name)
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            problem = "missing" if value is None else f"must be a string, got {type(value).__name__}"
            raise BadRow(f"{where}: field `{name}` {problem}")
        if required and not value.strip():
            raise BadRow(f"{where}: field `{name}` is empty")
        return value

    def _messages(self, value: Any, field: str, where: str, *, hint: str = "") -> list[dict[str, str]]:
        if not isinstance(value, list) or not value:
            raise BadRow(f"{where}: field `{field}` must be a non-empty list of messages{hint}")
        role_key = self.names["role"]
        messages = []
        for i, message in enumerate(value):
            raw = message.get(role_key) if isinstance(message, dict) else None
            role = self.roles.get(raw, raw) if isinstance(raw, str) else raw
            if role not in CHAT_ROLES:
                raise BadRow(f"{where}: {field}[{i}].{role_key} is {raw!r}; use one of {', '.join(CHAT_ROLES)} "
                             "or map it with data.sources[].roles")
            content = self._text(message, "content", f"{where}: {field}[{i}]")
            messages.append({"role": role, "content": content})
        return messages

    # ------------------------------------------------------------------ formats
    def _alpaca_row(self, row: dict, where: str) -> Segments:
        instruction = self._text(row, "instruction", where)
        extra = self._text(row, "input", where, required=False)
        output = self._text(row, "output", where)
        template = ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT
        return [(template.format(instruction=instruction, input=extra), False), (output + self.eos, True)]

    def _completion_row(self, row: dict, where: str) -> Segments:
        completion = self._text(row, "completion", where)
        return [(self._text(row, "prompt", where), False), (completion + self.eos, True)]

    def _text_row(self, row: dict, where: str) -> Segments:
        return [(self._text(row, "text", where) + self.eos, True)]

    def _chat_row(self, row: dict, where: str) -> Segments:
        name = self.names["messages"]
        hint = self._fields_hint(row) if row.get(name) is None else ""
        messages = self._messages(row.get(name), name, where, hint=hint)
        if messages[-1]["role"] != "assistant":
            raise BadRow(f"{where}: the last message of `{self.names['messages']}` must be from the assistant")
        return self._chat_segments(messages, where, first_target=0)

    def _fields_hint(self, row: dict) -> str:
        """Names a list field of the row that may hold the messages, and the mapping that reads it."""
        lists = sorted((name for name, value in row.items() if isinstance(value, list) and value),
                       key=lambda name: not all(isinstance(item, dict) for item in row[name]))  # messages first
        if not lists:
            return ""
        return f"; the row has a list field `{lists[0]}`: map it with {self.key}.fields: {{messages: {lists[0]}}}"

    def _classification_row(self, row: dict, where: str) -> tuple[str, int]:
        text = self._text(row, "text", where)
        name = self.names["label"]
        label = row.get(name)
        if label is None:
            raise BadRow(f"{where}: field `{name}` missing")
        if isinstance(label, str):
            label = self.label_ids.get(label, int(label) if label.isdigit() else label)  # CSV cells are strings
        num_labels = len(self.label_ids) or None
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < (num_labels or label + 1):
            return text, label
        expected = (f"one of {', '.join(self.label_ids)} (data.labels) or an index below {num_labels}" if num_labels
                    else "a class index >= 0 (set data.labels to use names)")
        raise BadRow(f"{where}: field `{name}` is {row.get(name)!r}; expected {expected}")

    def _preference_row(self, row: dict, where: str) -> Pair:
        prompt = row.get(self.names["prompt"])
        if isinstance(prompt, list):
            messages = self._messages(prompt, self.names["prompt"], where)
            chosen, rejected = (self._chat_reply(messages, row, field, where) for field in ("chosen", "rejected"))
            return Pair([], chosen, rejected)
        text = self._text(row, "prompt", where)
        return Pair([(text, False)], *([(self._text(row, field, where) + self.eos, True)]
                                       for field in ("chosen", "rejected")))

    def _prompt_row(self, row: dict, where: str) -> PromptExample:
        """Online RL: the prompt (text, or chat turns rendered with the generation prompt) and its reference
        answer, kept as the row's target so rollouts and evaluation recover both."""
        prompt = row.get(self.names["prompt"])
        if isinstance(prompt, list):
            messages = self._messages(prompt, self.names["prompt"], where)
            if messages[-1]["role"] == "assistant":
                raise BadRow(f"{where}: field `{self.names['prompt']}` ends with an assistant turn; the policy "
                             "writes that one")
            text = self._render(messages, generation_prompt=True)
        else:
            text = self._text(row, "prompt", where)
        answer = row.get(self.names["answer"])
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)  # a numeric answer in JSON
        segments = [(text, False), (self._text({self.names["answer"]: answer}, "answer", where), True)]
        return PromptExample(segments, other_fields(row, self.source))

    def _chat_reply(self, prompt: list[dict], row: dict, field: str, where: str) -> Segments:
        """Prompt turns then the reply, rendered by the chat template; only the reply is a target."""
        reply = row.get(self.names[field])
        if isinstance(reply, str):
            reply = [{self.names["role"]: "assistant", self.names["content"]: reply}]
        messages = self._messages(reply, self.names[field], where)
        if any(m["role"] != "assistant" for m in messages):
            raise BadRow(f"{where}: field `{self.names[field]}` must hold assistant messages only")
        return self._chat_segments(prompt + messages, where, first_target=len(prompt))

    # ------------------------------------------------------------------ chat templates
    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if self.template is None and not getattr(self.tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; set data.chat_template (chatml or llama3)")
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _chat_segments(self, messages: list[dict], where: str, *, first_target: int) -> Segments:
        """Each turn's rendered text; assistant turns from ``first_target`` on are targets."""
        segments, rendered = [], ""
        for i, message in enumerate(messages):
            is_target = message["role"] == "assistant" and i >= first_target
            if message["role"] == "assistant":
                header = self._render(messages[:i], generation_prompt=True)
                segments.append((header[len(rendered):], False))
                rendered = header
            full = self._render(messages[: i + 1], generation_prompt=False)
            if not full.startswith(rendered):
                raise DataError(f"{where}: the chat template does not render conversations prefix by prefix; "
                                "set data.chat_template to a built-in one")
            segments.append((full[len(rendered):], is_target))
            rendered = full
        return segments

