"""Names and model strings: the one place that decides what a valid name looks like.

Every name that ends up in a path (adapter names, base names, versions) passes through
`validate_name` first. `ModelRef` parses the strings apps send as ``model``:
``BASE``, ``BASE+NAME`` and ``BASE+NAME@V``. `public_name` decides what files meant for
publication (manifest, eval.json, card) say about a local path: its name, never the path.

This module does no I/O; resolving a reference against the store is `hub.store`'s job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

from hub.errors import InvalidName

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME_RE = re.compile(NAME_PATTERN)
_NAME_FIX = (
    "Use 1-64 characters: lower-case letters, digits, '.', '_' or '-', starting with a letter "
    "or digit (e.g. 'support-bot')."
)


def public_name(value: object) -> str:
    """What a published file may say about a local path: its last component only.

    Manifests, ``eval.json`` and cards are pushed to the Hub; a local path there would publish
    the user's home, temp or checkout folders. Digests identify the content, so the name is
    enough. URLs and ``hf://`` references are not local and are kept whole; None and ``""``
    stay ``""``.
    """
    text = "" if value is None else str(value)
    if not text or "://" in text:
        return text
    return PurePath(text).name or text.strip("/\\")


def validate_name(name: str, what: str = "adapter name") -> str:
    """Check that ``name`` is safe to use as an identifier and a single path component.

    Args:
        name: The candidate name.
        what: How to call the name in the error message ("adapter name", "base name").

    Returns:
        The name, unchanged.

    Raises:
        InvalidName: If the name does not match ``[a-z0-9][a-z0-9._-]{0,63}`` or holds ``..``.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        shown = name if isinstance(name, str) and len(name) <= 80 else repr(name)[:80]
        raise InvalidName(f"Invalid {what} {shown!r}", fix=_NAME_FIX, param="name")
    return name


def parse_version(text: str) -> int:
    """Parse a version as written after ``@`` (``3`` or ``v3``).

    Raises:
        InvalidName: If the text is not a positive integer.
    """
    raw = text[1:] if text[:1] in ("v", "V") else text
    if not raw.isdigit() or int(raw) < 1 or len(raw) > 9:
        raise InvalidName(
            f"Invalid version {text!r}",
            fix="Versions are positive integers, written NAME@3 or NAME@v3.",
            param="model",
        )
    return int(raw)


@dataclass(frozen=True)
class ModelRef:
    """A parsed model string.

    Attributes:
        base: Base model name (e.g. ``smollm2``).
        adapter: Adapter name, or None for the bare base.
        version: Adapter version, or None for "latest".
    """

    base: str
    adapter: str | None = None
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``BASE``, ``BASE+NAME`` or ``BASE+NAME@V``.

        Raises:
            InvalidName: If any part is not a valid name or version.
        """
        if not isinstance(text, str) or not text or len(text) > 200:
            raise InvalidName(
                f"Invalid model {str(text)[:80]!r}",
                fix="Write the model as BASE, BASE+ADAPTER or BASE+ADAPTER@VERSION.",
                param="model",
            )
        base, plus, rest = text.partition("+")
        validate_name(base, "base name")
        if not plus:
            return cls(base)
        name, at, version = rest.partition("@")
        validate_name(name, "adapter name")
        return cls(base, name, parse_version(version) if at else None)

    def __str__(self) -> str:
        if self.adapter is None:
            return self.base
        suffix = f"@{self.version}" if self.version is not None else ""
        return f"{self.base}+{self.adapter}{suffix}"


def parse_adapter_ref(text: str) -> tuple[str, int | None]:
    """Parse ``NAME`` or ``NAME@V`` as used by the CLI (``hub show``, ``export``...).

    Raises:
        InvalidName: If the name or version is invalid.
    """
    name, at, version = text.partition("@")
    validate_name(name)
    return name, (parse_version(version) if at else None)
