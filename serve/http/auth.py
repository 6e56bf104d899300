"""API keys: who may call the server, which adapters each key may use, who may administer it.

The ``--api-keys`` file is YAML mapping each key to what it may do::

    # key: settings
    sk-support-0123456789abcdef:
      name: support-team          # shown in logs instead of the key (default: key #N)
      adapters: ["support-*", "faq@2"]   # fnmatch patterns on NAME or NAME@V
    sk-ops-0123456789abcdef:
      name: ops
      admin: true                 # may load/unload adapters; sees everything
      adapters: ["*"]
    sk-base-only-0123456789ab: {}      # the base model only

A list instead of a mapping is shorthand for ``adapters:``. Every key may use the base model
unless ``base: false``. Keys are stored only as sha256 digests and compared in constant time;
they never appear in a message or a log line (the key's ``name`` does).

Where the job ends: this module answers "may this caller do this?". Hiding refused adapters
behind the same 404 as missing ones is done where models are resolved (`serve.http.generation`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.errors import InvalidInput
from serve.http.errors import AuthError, Forbidden

MIN_KEY_CHARS = 12
_PATTERN_RE = re.compile(r"[a-z0-9._\-*?\[\]!@]{1,80}")
_SETTINGS = {"name", "adapters", "admin", "base"}


@dataclass(frozen=True)
class Grant:
    """What one key may do.

    Attributes:
        name: Label used in logs (never the key).
        patterns: fnmatch patterns matched against ``NAME`` and ``NAME@V``.
        admin: May use the admin routes and sees every adapter.
        base: May use the bare base model.
    """

    name: str
    patterns: tuple[str, ...] = ()
    admin: bool = False
    base: bool = True


@dataclass(frozen=True)
class Principal:
    """The caller of one request. ``grant`` is None on a server without keys (all allowed)."""

    grant: Grant | None = None

    @property
    def name(self) -> str:
        """Label for logs."""
        return self.grant.name if self.grant else "local"

    @property
    def is_admin(self) -> bool:
        """True for admin keys and on a server without keys."""
        return self.grant is None or self.grant.admin

    def may_use_base(self) -> bool:
        """May call the bare base model."""
        return self.grant is None or self.grant.admin or self.grant.base

    def may_use(self, name: str, version: int) -> bool:
        """May call adapter ``name`` at ``version``."""
        if self.is_admin:
            return True
        assert self.grant is not None
        candidates = (name, f"{name}@{version}")
        return any(
            fnmatch.fnmatchcase(c, pattern) for pattern in self.grant.patterns for c in candidates
        )

    def require_admin(self) -> None:
        """Raise unless the caller may administer the server.

        Raises:
            Forbidden: A valid key without ``admin: true``.
        """
        if not self.is_admin:
            raise Forbidden(
                "This API key may not use admin routes",
                fix="Use a key with 'admin: true' in the --api-keys file.",
            )


@dataclass
class ApiKeys:
    """The keys of the ``--api-keys`` file, held as digests."""

    _digests: list[tuple[bytes, Grant]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        """Read and check the YAML file (all problems reported together, keys never shown).

        Raises:
            InvalidInput: Unreadable file or bad entries (param ``api_keys``).
        """
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise InvalidInput(
                f"Cannot read the API keys file {path}: {type(exc).__name__}",
                fix="Pass a readable YAML file mapping each key to its settings.",
                param="api_keys",
            ) from None
        if not isinstance(data, dict) or not data:
            raise InvalidInput(
                f"The API keys file {path} must map keys to settings",
                fix="Write e.g. 'sk-...: {adapters: [\"support-*\"], admin: false}'.",
                param="api_keys",
            )
        keys = cls()
        problems: list[str] = []
        for index, (key, settings) in enumerate(data.items(), start=1):
            label = f"key #{index}"
            grant, problem = _parse_entry(key, settings, label)
            if problem:
                problems.append(f"{label}: {problem}")
            elif grant is not None:
                keys._digests.append((_digest(str(key)), grant))
        if problems:
            raise InvalidInput(
                f"The API keys file {path} has problems: " + "; ".join(problems),
                fix="Fix those entries (keys are not shown here on purpose).",
                param="api_keys",
            )
        return keys

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> ApiKeys:
        """Build from an in-memory mapping (tests); same rules as `load`."""
        keys = cls()
        for index, (key, settings) in enumerate(data.items(), start=1):
            grant, problem = _parse_entry(key, settings, f"key #{index}")
            if problem or grant is None:
                raise InvalidInput(f"key #{index}: {problem}", param="api_keys")
            keys._digests.append((_digest(key), grant))
        return keys

    def authenticate(self, authorization: str | None) -> Principal:
        """Check an ``Authorization: Bearer KEY`` header in constant time.

        Raises:
            AuthError: Missing, malformed or unknown key.
        """
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError(
                "Missing API key",
                fix="Send 'Authorization: Bearer <key>' (the openai client's api_key).",
            )
        presented = _digest(token)
        found: Grant | None = None
        for digest, grant in self._digests:  # no early exit: same work for every key
            if hmac.compare_digest(presented, digest):
                found = grant
        if found is None:
            raise AuthError("Incorrect API key provided", fix="Check the key you were given.")
        return Principal(found)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _parse_entry(key: Any, settings: Any, label: str) -> tuple[Grant | None, str]:
    """Return (grant, "") or (None, problem)."""
    if not isinstance(key, str) or len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
        return None, f"keys must be strings of at least {MIN_KEY_CHARS} characters, no spaces"
    if settings is None:
        settings = {}
    if isinstance(settings, list):
        settings = {"adapters": settings}
    if not isinstance(settings, dict):
        return None, "settings must be a mapping or a list of adapter patterns"
    unknown = set(settings) - _SETTINGS
    if unknown:
        return None, f"unknown settings {sorted(map(str, unknown))}; use {sorted(_SETTINGS)}"
    patterns = settings.get("adapters") or []
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list) or not all(
        isinstance(p, str) and _PATTERN_RE.fullmatch(p) for p in patterns
    ):
        return None, "'adapters' must be a list of patterns like 'support-*' or 'faq@2'"
    for flag in ("admin", "base"):
        if flag in settings and not isinstance(settings[flag], bool):
            return None, f"'{flag}' must be true or false"
    name = settings.get("name", label)
    if not isinstance(name, str) or not name or len(name) > 64 or name == key:
        return None, "'name' must be a short label (and not the key itself)"
    grant = Grant(
        name=name,
        patterns=tuple(patterns),
        admin=bool(settings.get("admin", False)),
        base=bool(settings.get("base", True)),
    )
    return grant, ""
