"""Input formats, registered by name, and their conversion to the canonical rows.

Canonical rows (what the trainer codes against; ``line`` is the source line, see
`train.data.loaders`)::

    SFT:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
                 "line": int}
    preference: {"prompt": [messages ending with a user turn],
                 "chosen": [{"role": "assistant", "content": str}],
                 "rejected": [{"role": "assistant", "content": str}], "line": int}

Formats (`FORMATS`, detected from the keys of the first rows unless forced):

- ``chat``: ``messages`` (a list of ``{"role", "content"}``; other keys in a turn are ignored).
- ``alpaca``: ``instruction``, optional ``input``, ``output``, optional ``system``. The user turn
  is the instruction, followed by a blank line and the input when the input is not empty.
- ``completion``: ``prompt`` and ``completion``; each a string or a message list (TRL's
  conversational prompt-completion); optional ``system`` when the prompt is a string.
- ``preference``: ``prompt`` (string or message list), ``chosen`` and ``rejected`` (string or a
  one-message assistant list); optional ``system`` when the prompt is a string.

A row of the wrong shape raises `RowError` ("malformed"). Role order and empty text are checked
afterwards on the canonical row by `train.data.checks`, the same way for every format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from hub.errors import InvalidInput
from train.data.report import Kind

FormatName = Literal["chat", "alpaca", "completion", "preference"]
FormatChoice = Literal["auto", "chat", "alpaca", "completion", "preference"]
DETECT_ROWS = 200


class RowError(Exception):
    """A row is unusable for ``reason`` (a key of `train.data.report.REASONS`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Format:
    """One input format.

    Attributes:
        name: Registry name (``--format`` value).
        kind: ``sft`` or ``preference`` (which canonical row it produces).
        keys: Keys every row must have; auto-detection counts rows holding all of them.
        convert: Turns a row's fields into the canonical row (without ``line``).
        help: One line for ``--help`` and error messages.
    """

    name: FormatName
    kind: Kind
    keys: tuple[str, ...]
    convert: Callable[[dict[str, Any]], dict[str, Any]]
    help: str

    def matches(self, data: dict[str, Any]) -> bool:
        """True when ``data`` has every key of this format."""
        return all(key in data for key in self.keys)


def _field(data: dict[str, Any], key: str) -> Any:
    if key not in data:
        raise RowError("malformed", f"missing field {key!r}")
    if data[key] is None:
        raise RowError("malformed", f"field {key!r} is null")
    return data[key]


def _text(data: dict[str, Any], key: str, *, optional: bool = False) -> str:
    if optional and data.get(key) is None:
        return ""
    value = _field(data, key)
    if not isinstance(value, str):
        raise RowError("malformed", f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RowError(
            "malformed", f"field {key!r} must be a list of messages, got {type(value).__name__}"
        )
    turns = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise RowError(
                "malformed", f"{key} turn {number} must be an object, got {type(turn).__name__}"
            )
        for part in ("role", "content"):
            if part not in turn or turn[part] is None:
                raise RowError("malformed", f"{key} turn {number} has no {part!r}")
            if not isinstance(turn[part], str):
                got = type(turn[part]).__name__
                raise RowError(
                    "malformed", f"{key} turn {number} {part!r} must be a string, got {got}"
                )
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _prompt(data: dict[str, Any]) -> list[dict[str, str]]:
    """A prompt given as a string (plus optional ``system``) or as a message list."""
    value = _field(data, "prompt")
    if isinstance(value, list):
        return _messages(value, "prompt")
    if not isinstance(value, str):
        raise RowError(
            "malformed",
            f"field 'prompt' must be a string or a list of messages, got {type(value).__name__}",
        )
    system = _text(data, "system", optional=True)
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": value}]


def _answer(data: dict[str, Any], key: str) -> list[dict[str, str]]:
    """An assistant answer given as a string or as a message list."""
    value = _field(data, key)
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        return _messages(value, key)
    raise RowError(
        "malformed",
        f"field {key!r} must be a string or a list of messages, got {type(value).__name__}",
    )


def chat_row(data: dict[str, Any]) -> dict[str, Any]:
    """Canonical SFT row from ``{"messages": [...]}``."""
    return {"messages": _messages(_field(data, "messages"), "messages")}


def alpaca_row(data: dict[str, Any]) -> dict[str, Any]:
    """Canonical SFT row from ``{"instruction", "input"?, "output", "system"?}``."""
    instruction = _text(data, "instruction")
    extra = _text(data, "input", optional=True)
    output = _text(data, "output")
    system = _text(data, "system", optional=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    turns = [{"role": "system", "content": system}] if system else []
    return {
        "messages": [
            *turns,
            {"role": "user", "content": user},
            {"role": "assistant", "content": output},
        ]
    }


def completion_row(data: dict[str, Any]) -> dict[str, Any]:
    """Canonical SFT row from ``{"prompt", "completion"}``."""
    return {"messages": _prompt(data) + _answer(data, "completion")}


def preference_row(data: dict[str, Any]) -> dict[str, Any]:
    """Canonical preference row from ``{"prompt", "chosen", "rejected"}``."""
    return {
        "prompt": _prompt(data),
        "chosen": _answer(data, "chosen"),
        "rejected": _answer(data, "rejected"),
    }


# Detection order matters on ties: preference before completion (both have "prompt").
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "preference",
            "preference",
            ("prompt", "chosen", "rejected"),
            preference_row,
            "prompt/chosen/rejected preference pairs (strings or message lists)",
        ),
        Format("chat", "sft", ("messages",), chat_row, "chat: messages [{role, content}, ...]"),
        Format(
            "alpaca",
            "sft",
            ("instruction", "output"),
            alpaca_row,
            "alpaca: instruction, input (optional), output",
        ),
        Format(
            "completion",
            "sft",
            ("prompt", "completion"),
            completion_row,
            "prompt/completion (strings or message lists)",
        ),
    )
}


def detect_format(rows: list[dict[str, Any]], fmt: str = "auto") -> Format:
    """Return the format named ``fmt``, or the one most of the first rows match.

    Args:
        rows: Row fields (readable rows only), in file order.
        fmt: A `FORMATS` name or ``auto``.

    Raises:
        InvalidInput: Unknown format name, or no row matches any format.
    """
    if fmt != "auto":
        if fmt not in FORMATS:
            raise InvalidInput(
                f"Unknown dataset format {fmt!r}",
                fix=f"Use --format with one of: auto, {', '.join(FORMATS)}.",
                param="--format",
            )
        return FORMATS[fmt]
    sample = rows[:DETECT_ROWS]
    scores = {name: sum(f.matches(r) for r in sample) for name, f in FORMATS.items()}
    best = max(scores, key=lambda name: scores[name])  # first on ties, in registry order
    if scores[best] == 0:
        seen = sorted({key for r in sample for key in r})[:12]
        expected = "; ".join(f.help for f in FORMATS.values())
        raise InvalidInput(
            f"Cannot tell the dataset format: no row has the expected fields (keys seen: "
            f"{', '.join(seen) or 'none'})",
            fix=f"Expected one of: {expected}. Rename the fields or pass --format.",
            param="--format",
        )
    return FORMATS[best]
