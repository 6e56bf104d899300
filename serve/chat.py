"""The server front's text side: chat templates, tokenisation, detokenisation and stop strings.

Everything between the request's messages and the engine's token ids happens here, once for all
engines: the chat template saved with the adapter (``chat_template.jinja``, byte for byte what
training used) or else the base tokenizer's is rendered with the base's own HF tokenizer, so the
prompt is exactly what ``tokenizer.apply_chat_template`` gives (with the recipe's system prompt
from the adapter's manifest first when the request has no system message, as in training:
`recorded_system_prompt`); generated ids come back as text
through `Detokenizer`, which never splits a UTF-8 character, and `StopMatcher` cuts the text at
the first stop string.

Where the job ends: no HTTP and no model weights here. The engine stops on
`Formatter.stop_token_ids` itself; the HTTP layer (`serve.http`) decides what to send and when.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hub.bases import BaseInfo
from hub.errors import InvalidInput, Unsupported
from hub.manifest import CHAT_TEMPLATE_FILE
from hub.store import AdapterRecord
from hub.system_turn import fold_system_turn, starts_with_system
from serve.grammar import Grammars

# Turn-end tokens of common chat formats that should end generation when the vocabulary has them.
_END_TOKENS = ("<|im_end|>",)
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_TEMPLATE_CACHE_SIZE = 256


def recorded_system_prompt(adapter: AdapterRecord | None) -> str:
    """The system prompt the adapter trained with (manifest ``extra.system_prompt``), or ``""``."""
    manifest = adapter.manifest if adapter is not None else None
    value = manifest.extra.get("system_prompt") if manifest is not None else None
    return value if isinstance(value, str) else ""


def _byte_level_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet (each byte written as one printable character).

    Printable Latin-1 bytes stand for themselves; the 68 others are written as characters from
    U+0100 upwards, in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    table = {chr(b): b for b in printable}
    extra = 0
    for byte in range(256):
        if byte not in printable:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


class Formatter:
    """Prompts in, token ids out, and back, for one base model.

    Args:
        base: The base whose HF tokenizer (``BaseInfo.path``) is loaded.
        tokenizer: An already loaded tokenizer (tests); loaded from ``base.path`` when None.
    """

    def __init__(self, base: BaseInfo, tokenizer: Any | None = None) -> None:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base.path, trust_remote_code=False)
        self.base = base
        self.tokenizer = tokenizer
        if not tokenizer.chat_template:
            raise Unsupported(
                f"The tokenizer of base {base.name!r} has no chat template",
                fix="Use /v1/completions, or add a chat_template.jinja to the base folder.",
            )
        self.stop_token_ids = self._stop_token_ids(base)
        self._templates: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._byte_table = _byte_level_decoder() if self._byte_level else {}
        self._grammars: Grammars | None = None

    @property
    def grammars(self) -> Grammars:
        """Output constraints compiled for this tokenizer (built at first use, then cached)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.model_vocab_size(),
                                      self.stop_token_ids)
        return self._grammars

    def model_vocab_size(self) -> int:
        """Columns of the model's logits: ``config.json``'s ``vocab_size`` (else the tokenizer's).

        It may exceed the tokenizer's length (padded embeddings); masks must cover it.
        """
        import json

        config = Path(self.base.path) / "config.json"
        if config.is_file():
            value = json.loads(config.read_text()).get("vocab_size")
            if isinstance(value, int) and value > 0:
                return value
        return len(self.tokenizer)

    # -- prompts --------------------------------------------------------------------------

    def template_for(self, adapter: AdapterRecord | None) -> str:
        """Return the chat template for ``adapter``: its own file, else the base tokenizer's."""
        if adapter is None:
            return self.tokenizer.chat_template
        key = f"{adapter.name}@{adapter.version}"
        with self._lock:
            if key in self._templates:
                self._templates.move_to_end(key)
                return self._templates[key]
        path = Path(adapter.path) / CHAT_TEMPLATE_FILE
        template = path.read_text(encoding="utf-8") if path.is_file() else None
        template = template or self.tokenizer.chat_template
        with self._lock:
            self._templates[key] = template
            while len(self._templates) > _TEMPLATE_CACHE_SIZE:
                self._templates.popitem(last=False)
        return template

    def render_chat(self, messages: list[dict[str, Any]], adapter: AdapterRecord | None,
                    tools: list[dict[str, Any]] | None = None) -> str:
        """Render ``messages`` with the adapter's template and the assistant generation prompt.

        A conversation without a system message gets the adapter's recorded system prompt
        first (`recorded_system_prompt`), the rule training applied (`train.sft`); a system
        turn the template refuses (Gemma 2) is folded into the first user message
        (`hub.system_turn`), as training folded it.

        Args:
            messages: The conversation (tool calls and tool results as templates expect them).
            adapter: Whose template to use (None: the base's).
            tools: OpenAI ``tools`` for the template's own tools support (None: no tools).

        Raises:
            InvalidInput: The template refused the conversation (e.g. roles must alternate).
        """
        import jinja2

        system = recorded_system_prompt(adapter)
        if system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        template = self.template_for(adapter)
        try:
            return self._apply(messages, template, tools)
        except jinja2.TemplateError as exc:
            if starts_with_system(messages):  # refused (Gemma 2): folded as training did
                try:
                    return self._apply(fold_system_turn(messages), template, tools)
                except jinja2.TemplateError:
                    pass
            raise InvalidInput(
                f"The chat template refused these messages: {str(exc)[:200]}",
                fix="Check the order and roles of 'messages'.",
                param="messages",
            ) from exc

    def _apply(self, messages: list[dict[str, Any]], template: str,
               tools: list[dict[str, Any]] | None) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tools=tools or None, tokenize=False,
            add_generation_prompt=True)

    def encode_chat(
        self, messages: list[dict[str, Any]], adapter: AdapterRecord | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of the rendered chat (special tokens come from the template, none added)."""
        text = self.render_chat(messages, adapter, tools)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_text(self, prompt: str) -> list[int]:
        """Token ids of a plain completion prompt (with the tokenizer's usual special tokens)."""
        return list(self.tokenizer(prompt)["input_ids"])

    def decode_raw(self, ids: list[int]) -> str:
        """Text of ``ids`` with special tokens kept (tool-call markers such as [TOOL_CALLS])."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # -- output ---------------------------------------------------------------------------

    def detokenizer(self) -> Detokenizer:
        """A fresh incremental detokeniser for one generated sequence."""
        return Detokenizer(self.tokenizer, skip_ids=self.stop_token_ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (used for ``logprobs``)."""
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        if self._byte_level and all(ch in self._byte_table for ch in piece):
            return bytes(self._byte_table[ch] for ch in piece)
        match = _BYTE_TOKEN.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_text(self, token_id: int) -> str:
        """One token as text (partial UTF-8 shown with replacement characters)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _stop_token_ids(self, base: BaseInfo) -> list[int]:
        """The end-of-sequence ids: the tokenizer's eos, the generation config's, turn ends."""
        ids: list[int] = []
        eos = self.tokenizer.eos_token_id
        candidates: list[Any] = [eos]
        gen_config = Path(base.path) / "generation_config.json"
        if gen_config.is_file():
            import json

            value = json.loads(gen_config.read_text()).get("eos_token_id")
            candidates.extend(value if isinstance(value, list) else [value])
        vocab = self.tokenizer.get_vocab()
        candidates.extend(vocab.get(token) for token in _END_TOKENS)
        for candidate in candidates:
            if isinstance(candidate, int) and candidate >= 0 and candidate not in ids:
                ids.append(candidate)
        return ids


class Detokenizer:
    """Turns generated ids into text deltas, holding back bytes of an unfinished character.

    Decodes a small window (the last emitted tokens plus the new ones) and emits the difference,
    so the work per token stays constant and the concatenated deltas equal decoding everything.

    Args:
        tokenizer: The HF tokenizer.
        skip_ids: Ids never shown as text (the stop tokens).
    """

    def __init__(self, tokenizer: Any, skip_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip = set(skip_ids)
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the new complete text (may be empty)."""
        if token_id in self._skip:
            return ""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character becomes U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


class StopMatcher:
    """Cuts generated text at the first stop string, holding back text that may start one.

    Args:
        stops: Stop strings (empty: nothing is held back).
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add generated text; return what is safe to send now. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return buffer[:cut]
        keep = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), keep, -1):
                if buffer.endswith(stop[:size]):
                    keep = size
                    break
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """Return the held-back text at the end of generation (no stop string followed)."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held


__all__ = ["Detokenizer", "Formatter", "StopMatcher"]
