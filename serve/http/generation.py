"""One generation request from resolved model to text pieces, shared by chat and completions.

The steps every generating endpoint takes: resolve ``model`` in the store for this request (so a
version registered a moment ago is used), hiding adapters the key may not use behind the same 404
as missing ones; check prompt + ``max_tokens`` against the context; then drive the engine stream
under the per-request deadline, turning token ids into text pieces (incremental detokenisation,
stop strings, logprobs aligned with the text actually sent). Whatever happens (finish, stop
string, timeout, client gone, error) `Generation.close` ends the engine request and frees its
slot.

A response may drive several generations at once (``n`` choices, a batch of prompts): they are
submitted together, so the engine batches them, and `respond` collects them (non-stream) or
interleaves their pieces as they come (SSE, each event naming its choice ``index``). The first
error or a client gone ends them all.

Where the job ends: no JSON shapes here; the route modules turn `Piece` objects into OpenAI
responses and SSE chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from hub.errors import (
    ContextLengthExceeded,
    EngineUnavailable,
    Incompatible,
    InvalidName,
    LoradockError,
    NotFound,
)
from hub.names import ModelRef
from hub.store import Resolved
from serve.chat import StopMatcher
from serve.engine import GenerationRequest, SamplingParams, TokenChunk, adapter_key
from serve.http.auth import Principal
from serve.http.errors import RequestTimeout, envelope, error_payload
from serve.http.sse import DONE, SSEResponse, sse_data, wait_for_disconnect
from serve.http.state import AppState

log = logging.getLogger("loradock.serve")
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


def missing_model(model: str) -> NotFound:
    """The one 404 for a model that does not exist *or* that the caller may not use."""
    shown = model if len(model) <= 120 else model[:120] + "..."
    return NotFound(
        f"The model {shown!r} does not exist or you do not have access to it",
        fix="See GET /v1/models for the models you may use.",
        param="model",
    )


async def resolve_model(state: AppState, principal: Principal, model: str) -> Resolved:
    """Resolve ``BASE``, ``BASE+NAME`` or ``BASE+NAME@V`` for this caller.

    Raises:
        InvalidName: Malformed model string (400).
        NotFound: Unknown, not served here, or not allowed for this key (identical 404s).
        Incompatible: The adapter belongs to another base and the key may use it (400).
    """
    try:
        ref = ModelRef.parse(model)
    except InvalidName as exc:
        raise InvalidName(exc.message, fix=exc.fix, param="model") from None
    if ref.base != state.base.name:
        raise missing_model(model)
    if ref.adapter is None:
        if not principal.may_use_base():
            raise missing_model(model)
        return Resolved(state.base)
    try:
        resolved = await asyncio.to_thread(state.store.resolve, model)
    except NotFound:
        raise missing_model(model) from None
    except Incompatible:
        record = await asyncio.to_thread(state.store.get, ref.adapter, ref.version)
        if not principal.may_use(record.name, record.version):
            raise missing_model(model) from None
        raise
    assert resolved.adapter is not None
    if not principal.may_use(resolved.adapter.name, resolved.adapter.version):
        raise missing_model(model)
    return resolved


def plan_max_tokens(prompt_tokens: int, wanted: int | None, max_model_len: int, param: str) -> int:
    """The completion budget: ``wanted``, or what is left of the context when not given.

    Raises:
        ContextLengthExceeded: The prompt, or prompt + ``wanted``, does not fit.
    """
    if prompt_tokens >= max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_tokens} tokens",
            fix="Shorten the prompt.",
            param="messages" if param == "max_completion_tokens" else "prompt",
        )
    if wanted is None:
        return max_model_len - prompt_tokens
    if prompt_tokens + wanted > max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens, but you requested "
            f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the prompt, {wanted} for the "
            "completion)",
            fix=f"Lower {param} to at most {max_model_len - prompt_tokens}, or shorten the prompt.",
            param=param,
        )
    return wanted


async def race_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client goes away first (then cancel it and raise ClientGone)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone()


@dataclass
class TokenOut:
    """One generated token as sent: id, logprob, alternatives, and where its text starts."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    start: int
    end: int


@dataclass
class Piece:
    """Text and tokens released together; ``finish_reason`` set on the last piece."""

    text: str = ""
    tokens: list[TokenOut] = field(default_factory=list)
    finish_reason: str | None = None


class Generation:
    """Drives one engine request and turns its token chunks into `Piece` objects.

    Args:
        state: The app state.
        resolved: Base and adapter to use.
        prompt_ids: The tokenised prompt.
        params: Sampling parameters (``stop_token_ids`` already filled).
        stops: Stop strings.
        request_id: The response id (also the engine's request id).
        arrived: ``time.monotonic()`` when the request arrived (deadline and TTFT start).
        counts_prompt: Whether ``usage.prompt_tokens`` counts this prompt (False for the
            second and later choices of one prompt).
    """

    def __init__(
        self,
        state: AppState,
        resolved: Resolved,
        prompt_ids: list[int],
        params: SamplingParams,
        stops: list[str],
        request_id: str,
        arrived: float,
        counts_prompt: bool = True,
    ) -> None:
        self.counts_prompt = counts_prompt
        self.state = state
        self.resolved = resolved
        self.request = GenerationRequest(request_id, prompt_ids, resolved.adapter, params)
        self.request_id = request_id
        self.arrived = arrived
        self.deadline = arrived + state.request_timeout_s
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""
        self._detok = state.fmt.detokenizer()
        self._stop = StopMatcher(stops)
        self._stream: AsyncIterator[TokenChunk] | None = None
        self._first: TokenChunk | None = None
        self._ended = False
        self._closed = False
        self._raw_len = 0
        self._held: list[TokenOut] = []

    @property
    def token_ids(self) -> list[int]:
        """The generated ids so far (stop tokens excluded)."""
        return list(self._detok.ids)

    @property
    def model(self) -> str:
        """The model string reported in responses (version pinned: ``BASE+NAME@V``)."""
        return self.resolved.model

    async def _next(self) -> TokenChunk | None:
        assert self._stream is not None
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(anext(self._stream), remaining)
        except StopAsyncIteration:
            self._ended = True
            return None
        except TimeoutError:
            self.state.metrics.count_event("timeouts")
            raise RequestTimeout(
                f"The request ran past the server's {self.state.request_timeout_s:g} s timeout",
                fix="Ask for fewer tokens or retry when the server is less busy.",
            ) from None

    async def start(self) -> None:
        """Submit to the engine and wait for the first token (queue errors surface here)."""
        self.state.check_accepting()
        self._stream = aiter(self.state.engine.generate(self.request))
        self._first = await self._next()
        metrics = self.state.metrics
        metrics.observe_ttft(time.monotonic() - self.arrived)
        if self._first is not None:
            if self._first.prompt_tokens:
                self.prompt_tokens = self._first.prompt_tokens
            if self._first.adapter_load_s > 0:
                metrics.observe_adapter_load(self._first.adapter_load_s,
                                             adapter_key(self.request.adapter))

    async def pieces(self) -> AsyncIterator[Piece]:
        """Yield pieces until the finish (call `start` first)."""
        chunk, self._first = self._first, None
        while True:
            if chunk is None:
                yield self._finish("stop")
                return
            piece = self._consume(chunk)
            if piece.finish_reason or piece.text or piece.tokens:
                yield piece
            if self.finish_reason:
                return
            chunk = await self._next()

    async def collect(self) -> Piece:
        """Run to the end and return everything as one piece."""
        await self.start()
        whole = Piece()
        async for piece in self.pieces():
            whole.text += piece.text
            whole.tokens += piece.tokens
            whole.finish_reason = piece.finish_reason
        return whole

    def _consume(self, chunk: TokenChunk) -> Piece:
        params = self.request.params
        stop_ids = set(params.stop_token_ids)
        text = ""
        for i, token_id in enumerate(chunk.token_ids):
            self.completion_tokens += 1
            delta = self._detok.push(token_id)
            if params.logprobs and token_id not in stop_ids:
                logprob = chunk.logprobs[i] if chunk.logprobs and i < len(chunk.logprobs) else 0.0
                tops = chunk.top_logprobs[i] if chunk.top_logprobs and i < len(chunk.top_logprobs) \
                    else {}
                top = sorted(tops.items(), key=lambda kv: -kv[1])[: params.top_logprobs]
                self._held.append(TokenOut(int(token_id), float(logprob), top,
                                           self._raw_len, self._raw_len + len(delta)))
            self._raw_len += len(delta)
            text += self._stop.push(delta)
            if self._stop.stopped:
                break
        if self._stop.stopped:
            return self._release(text, "stop")
        if chunk.finish_reason is not None:
            if chunk.finish_reason == "abort":
                raise EngineUnavailable(
                    "The engine aborted this request (it is shutting down or failed)",
                    fix="Retry the request.",
                )
            text += self._stop.push(self._detok.flush())
            text += self._stop.flush()
            return self._release(text, chunk.finish_reason)
        return self._release(text, None)

    def _finish(self, reason: str) -> Piece:
        text = self._stop.push(self._detok.flush()) + self._stop.flush()
        return self._release(text, reason)

    def _release(self, text: str, finish_reason: str | None) -> Piece:
        self.text += text
        sent = len(self.text)
        if finish_reason is None:
            ready = [t for t in self._held if t.end <= sent]
        else:
            ready = [t for t in self._held if t.start < sent or t.end <= sent]
            self.finish_reason = finish_reason
        self._held = self._held[len(ready):]
        return Piece(text, ready, finish_reason)

    async def close(self) -> None:
        """End the engine request (abort if unfinished) and count tokens; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.state.metrics.count_tokens(self.prompt_tokens, self.completion_tokens)
        if self._stream is None:
            return
        unfinished = not self._ended and self.finish_reason is None
        closer = getattr(self._stream, "aclose", None)
        try:
            if closer is not None:
                await closer()
        except Exception as exc:  # the engine's cleanup must not hide the response
            log.warning("closing request %s failed: %s", self.request_id, type(exc).__name__)
        if unfinished or self._stop.stopped:
            try:
                await self.state.engine.abort(self.request_id)
            except Exception as exc:
                log.warning("abort of %s failed: %s", self.request_id, type(exc).__name__)


async def _all(works: list[Awaitable[T]]) -> list[T]:
    """Await every ``work``; on the first error cancel the others and raise it."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    for task in done:
        if task.exception() is not None:
            for other in pending:
                other.cancel()
            for other in pending:
                with contextlib.suppress(BaseException):
                    await other
            raise task.exception()  # type: ignore[misc]
    return [task.result() for task in tasks]


async def _merged(gens: list[Generation]) -> AsyncIterator[tuple[int, Piece]]:
    """``(index, piece)`` of every generation as soon as each is ready."""
    if len(gens) == 1:
        async for piece in gens[0].pieces():
            yield 0, piece
        return
    queue: asyncio.Queue[tuple[int, Piece | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, gen: Generation) -> None:
        try:
            async for piece in gen.pieces():
                await queue.put((index, piece, None))
            await queue.put((index, None, None))
        except Exception as exc:
            await queue.put((index, None, exc))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            index, piece, error = await queue.get()
            if error is not None:
                raise error
            if piece is None:
                remaining -= 1
                continue
            yield index, piece
    finally:
        for task in tasks:
            task.cancel()


async def respond(
    request: Request,
    gens: list[Generation],
    *,
    stream: bool,
    head: Callable[[], list[dict[str, Any]]],
    events: Callable[[int, Piece], list[dict[str, Any]]],
    tail: Callable[[], list[dict[str, Any]]],
    whole: Callable[[list[Piece]], dict[str, Any]],
    principal: Principal,
) -> Response:
    """Run ``gens`` and answer as one JSON body or as SSE, freeing their slots whatever happens.

    Errors before the first token (queue full, draining, bad adapter) become normal error
    responses; errors after it, in a stream, become a final ``data: {"error": ...}`` event.

    Args:
        request: The HTTP request (watched for the client going away).
        gens: The prepared generations (choice ``index`` = position in the list).
        stream: SSE or one JSON body.
        head: Payloads sent before the first piece (stream only).
        events: Payloads for one piece of choice ``index`` (stream only).
        tail: Payloads after the last piece, before ``[DONE]`` (stream only).
        whole: The JSON body for the collected results, one per generation (non-stream only).
        principal: The caller (its label goes to the log line).
    """
    metrics = gens[0].state.metrics

    async def close_all() -> None:
        for gen in gens:
            await gen.close()

    def log_all(outcome: str) -> None:
        for gen in gens:
            _log_done(gen, principal, outcome)

    if not stream:
        try:
            pieces = await race_disconnect(request, _all([g.collect() for g in gens]))
        except ClientGone:
            metrics.count_event("client_disconnects")
            log_all("client_gone")
            return Response(status_code=499)
        finally:
            await close_all()
        log_all("ok")
        return JSONResponse(whole(pieces))
    try:
        await race_disconnect(request, _all([g.start() for g in gens]))
    except ClientGone:
        await close_all()
        metrics.count_event("client_disconnects")
        log_all("client_gone")
        return Response(status_code=499)
    except BaseException:
        await close_all()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            for payload in head():
                yield sse_data(payload)
            async for index, piece in _merged(gens):
                for payload in events(index, piece):
                    yield sse_data(payload)
            for payload in tail():
                yield sse_data(payload)
            yield DONE
        except LoradockError as exc:
            yield sse_data(envelope(exc))
        except Exception as exc:
            log.error("stream %s failed: %s", gens[0].request_id, type(exc).__name__,
                      exc_info=exc)
            yield sse_data(error_payload("The server failed during generation; see its log.",
                                         "server_error", None, "internal_error"))

    async def on_close(disconnected: bool) -> None:
        await close_all()
        if disconnected:
            metrics.count_event("client_disconnects")
        log_all("client_gone" if disconnected else "ok")

    return SSEResponse(body(), on_close)


def _log_done(gen: Generation, principal: Principal, outcome: str) -> None:
    log.info(
        "%s model=%s key=%s %s finish=%s prompt_tokens=%d completion_tokens=%d %.3fs",
        gen.request_id, gen.model, principal.name, outcome, gen.finish_reason,
        gen.prompt_tokens, gen.completion_tokens, time.monotonic() - gen.arrived,
    )
