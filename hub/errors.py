"""Domain errors shared by every loradock package.

Library code raises these; only the edges translate them: the CLI into an exit code and one line
(`loradock/`), the HTTP server into an OpenAI error envelope (`serve/http`). Each error carries the
bad value, what was expected, and the fix, so that both edges print the same sentence.

This module knows nothing about HTTP or the CLI beyond the status code and exit code each kind of
error maps to; the edges decide how to show them.
"""

from __future__ import annotations


class LoradockError(Exception):
    """Base class of every error loradock raises on purpose.

    Attributes:
        message: One sentence naming the problem and the bad value.
        fix: What the user should do about it (may be empty).
        param: The request field or CLI option at fault, when there is one.
        http_status: Status code the HTTP edge returns.
        error_type: OpenAI error ``type`` string.
        code: OpenAI error ``code`` string (machine readable).
        exit_code: Process exit code the CLI edge uses.
    """

    http_status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"
    exit_code = 2

    def __init__(self, message: str, *, fix: str = "", param: str | None = None) -> None:
        self.message = message
        self.fix = fix
        self.param = param
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """Return the message and the fix as one line, as the CLI prints it."""
        text = self.message.rstrip(".")
        return f"{text}. {self.fix}".strip() if self.fix else f"{text}."


class InvalidName(LoradockError):
    """A name that would be used as a path or identifier is not allowed."""

    code = "invalid_name"


class InvalidInput(LoradockError):
    """A value given by the user is malformed or out of range."""


class NotFound(LoradockError):
    """A base model, adapter or version does not exist (or the caller may not see it)."""

    http_status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"
    exit_code = 3


class NotAnAdapter(LoradockError):
    """A folder given as an adapter is not a PEFT LoRA adapter."""

    code = "not_an_adapter"


class UnsafeWeights(LoradockError):
    """Weights in a format that can execute code on load (pickle) were refused."""

    code = "unsafe_weights"


class Incompatible(LoradockError):
    """An adapter does not fit the base model it is used with."""

    code = "incompatible_adapter"


class ContextLengthExceeded(InvalidInput):
    """The prompt (or prompt plus completion) does not fit the model's context."""

    code = "context_length_exceeded"


class Unsupported(LoradockError):
    """The request is valid but this engine, exporter or architecture cannot do it."""

    code = "unsupported"


class Conflict(LoradockError):
    """The operation conflicts with the current state (e.g. removing an adapter in use)."""

    http_status = 409
    code = "conflict"


class StoreCorrupt(LoradockError):
    """Files in the store no longer match the checksums recorded at registration."""

    http_status = 500
    error_type = "server_error"
    code = "store_corrupt"
    exit_code = 4


class DigestMismatch(StoreCorrupt):
    """Files fetched from a remote differ from the digests they were published with."""

    http_status = 502
    code = "digest_mismatch"


class DraftCard(LoradockError):
    """A model card still has items to complete and may not be published."""

    code = "draft_card"


class RemoteError(LoradockError):
    """A remote hub (e.g. the Hugging Face Hub) failed or refused the request."""

    http_status = 502
    error_type = "server_error"
    code = "remote_error"
    exit_code = 5


class Overloaded(LoradockError):
    """The server's queue is full; the client should retry later."""

    http_status = 429
    error_type = "rate_limit_error"
    code = "server_overloaded"
    exit_code = 6

    def __init__(self, message: str, *, fix: str = "", retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, fix=fix)


class EngineUnavailable(LoradockError):
    """The engine is starting, draining or has failed."""

    http_status = 503
    error_type = "server_error"
    code = "engine_unavailable"
    exit_code = 6
