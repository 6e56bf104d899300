"""The bridge from the scheduler's worker thread to one request's asyncio consumer.

The worker calls `TokenSink.push` (thread-safe) with `TokenChunk`s, then `TokenSink.close` (or
`TokenSink.fail` with an exception). The consumer iterates the `TokenStream` returned by
``Engine.generate``; chunks that pile up while it is slow are merged into one ("tokens produced
since the previous chunk"). Closing the stream (``aclose``), cancelling the task awaiting it
(client gone), or dropping it unfinished calls the abort callback, which frees the slot.

Where the job ends: this module moves chunks across threads; it decides nothing about them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from serve.engine import TokenChunk

_END = object()


class TokenSink:
    """The producer side: used by the worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.closed = False

    def _put(self, item: object) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody listens any more
            return False
        return True

    def push(self, chunk: TokenChunk) -> bool:
        """Send a chunk; False when the consumer's event loop is gone."""
        return not self.closed and self._put(chunk)

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error`` (raised by the consumer's next ``__anext__``)."""
        if not self.closed:
            self.closed = True
            self._put(error)

    def close(self) -> None:
        """End the stream normally."""
        if not self.closed:
            self.closed = True
            self._put(_END)


def _merge(first: TokenChunk, more: TokenChunk) -> None:
    first.token_ids.extend(more.token_ids)
    if first.logprobs is not None or more.logprobs is not None:
        first.logprobs = (first.logprobs or []) + (more.logprobs or [])
    if first.top_logprobs is not None or more.top_logprobs is not None:
        first.top_logprobs = (first.top_logprobs or []) + (more.top_logprobs or [])
    first.finish_reason = more.finish_reason


class TokenStream:
    """The consumer side: an async iterator of `TokenChunk` for one request."""

    def __init__(self, sink: TokenSink, request_id: str, on_abort: Callable[[str], None]) -> None:
        self._sink = sink
        self.request_id = request_id
        self._on_abort = on_abort
        self._done = False
        self._buffer: deque[object] = deque()

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> TokenChunk:
        if self._done:
            raise StopAsyncIteration
        queue, buffer = self._sink.queue, self._buffer
        if not buffer:
            try:
                buffer.append(await queue.get())
            except asyncio.CancelledError:
                self._abort()
                raise
        while not queue.empty():
            buffer.append(queue.get_nowait())
        item = buffer.popleft()
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        assert isinstance(item, TokenChunk)
        while item.finish_reason is None and buffer and isinstance(buffer[0], TokenChunk):
            _merge(item, buffer.popleft())
        if item.finish_reason is not None:
            self._done = True
        return item

    def _abort(self) -> None:
        if not self._done:
            self._done = True
            self._on_abort(self.request_id)

    async def aclose(self) -> None:
        """Stop the request (frees its slot); no-op once it finished."""
        self._abort()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._abort()
