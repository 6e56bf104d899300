"""Continuous batching: one decode pass per step for all running sequences, whatever adapters.

A worker thread runs the loop; requests join and leave between steps.

Each loop iteration (a *step*):

1. **Reap**: aborted requests, requests past their deadline, and finished ones free their KV row
   and unpin their adapter; rows are re-compacted (the last row moves into the hole).
2. **Load**: waiting requests whose adapter is not resident start a background load (others keep
   decoding meanwhile).
3. **Admit / prefill**: waiting requests whose adapter is resident take a KV row (up to
   ``max_running``) and are prefilled together in one pass (linear layers batched over all
   their tokens), up to ``prefill_chunk`` prompt tokens per step; a longer prompt is prefilled
   in chunks over several steps (at most one such sequence, kept in the last row). A completed
   prefill yields the first token, streamed at once.
4. **Decode**: rows ``0..d-1`` (all fully prefilled sequences), each with its own position and
   LoRA slot, go through the *same* forward pass as step 3's prompt chunks (`Scheduler._forward`);
   one token is sampled per row and pushed to its stream.

Stopping: a sampled token in ``stop_token_ids`` ends the sequence with ``finish_reason="stop"``
and is *not* included in ``token_ids``; ``max_tokens`` or the context cap end it with
``"length"``; `Scheduler.abort` ends it with ``"abort"``. A request past its deadline
(``request_timeout_s`` after submission) fails with `hub.errors.Overloaded` if it was still
waiting, else ends with ``"abort"``.

Where the job ends: the scheduler orders work and streams tokens. Tensors are the runner's;
residency is the adapter cache's; validating requests is the engine's.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hub.errors import Conflict, EngineUnavailable, LoradockError, Overloaded
from serve.engine import GenerationRequest, TokenChunk, adapter_key
from serve.runtime.adapter_cache import AdapterCache, NoRoom, Resident
from serve.runtime.sampling import RowState, new_row, sample
from serve.runtime.stats import EngineStats
from serve.runtime.stream import TokenSink

if TYPE_CHECKING:
    import torch

    from serve.runtime.prefix_cache import PrefixCache
    from serve.runtime.runner import ModelRunner

# Seconds a request may wait for an adapter slot before a resident adapter is drained for it.
STARVE_S = 0.5


@dataclass
class Sequence:
    """One request's state inside the scheduler."""

    request: GenerationRequest
    sink: TokenSink
    deadline: float
    submitted: float
    key: str | None = None
    sampler: RowState | None = None
    resident: Resident | None = None
    row: int = -1
    prefilled: int = 0
    position: int = 0
    pending: int = -1
    generated: int = 0
    load_s: float = 0.0
    waited_for_load: bool = False
    loading: bool = False
    load_error: BaseException | None = None
    first_chunk: bool = True
    finish: str | None = None
    tokens: list[int] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        """True while the prompt is only partly prefilled (the sequence has no token yet)."""
        return self.finish is None and self.prefilled < len(self.request.prompt_ids)

    @property
    def slot(self) -> int:
        """LoRA stack slot (-1: bare base)."""
        return self.resident.slot if self.resident is not None else -1


class Scheduler:
    """Owns the waiting queue, the running set and the worker thread."""

    def __init__(
        self,
        runner: ModelRunner,
        cache: AdapterCache,
        step_lock: threading.Lock,
        *,
        max_running: int,
        max_queue: int,
        prefill_chunk: int,
        request_timeout_s: float,
        stats: EngineStats,
        prefix: PrefixCache | None = None,
    ) -> None:
        """Create a stopped scheduler (see `start`); ``prefix``: prompt-prefix KV reuse."""
        self.runner = runner
        self.cache = cache
        self.step_lock = step_lock
        self.max_running = max_running
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.request_timeout_s = request_timeout_s
        self.stats = stats
        self.prefix = prefix
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == KV row
        self.by_id: dict[str, Sequence] = {}
        self.aborts: deque[str] = deque()
        self.accepting = True
        self.stopping = False
        self.error: str = ""
        self.thread: threading.Thread | None = None

    # -- called from the event loop ---------------------------------------------------------

    def start(self, prologue: Callable[[], None] | None = None) -> None:
        """Start the worker thread; it runs ``prologue`` first, and this waits for it.

        The engine's warm-up passes run there, on the thread that will run every pass (its
        OpenMP team and first-use costs are then paid before the first request).

        Raises:
            Exception: Whatever ``prologue`` raised (the thread has then stopped).
        """
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            if prologue is not None:
                try:  # not under inference_mode: tensors it creates (LoRA pools) stay writable
                    prologue()
                except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                    failure.append(exc)
                    ready.set()
                    return
            ready.set()
            self._run()

        self.thread = threading.Thread(target=run, name="peft-scheduler", daemon=True)
        self.thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    def submit(self, request: GenerationRequest, sink: TokenSink) -> None:
        """Queue a validated request.

        Raises:
            EngineUnavailable: Draining or stopped.
            Conflict: A request with the same id is in flight.
            Overloaded: The waiting queue is full.
        """
        now = time.monotonic()
        with self.lock:
            if not self.accepting:
                raise EngineUnavailable("The engine is shutting down",
                                        fix="Retry against another replica or after restart.")
            if request.request_id in self.by_id:
                raise Conflict(f"Request id {request.request_id!r} is already in flight",
                               fix="Use a unique request id.", param="request_id")
            if len(self.waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise Overloaded(
                    f"{len(self.waiting)} requests are already waiting (max_queue="
                    f"{self.max_queue})",
                    fix="Retry after the Retry-After delay.",
                    retry_after_s=self.retry_after_s(),
                )
            seq = Sequence(request, sink, deadline=now + self.request_timeout_s, submitted=now)
            if request.adapter is not None:
                seq.key = adapter_key(request.adapter)
            seq.sampler = new_row(request.params, request.prompt_ids)
            self.waiting.append(seq)
            self.by_id[request.request_id] = seq
        if request.adapter is not None:
            self.cache.note_version(request.adapter)  # older versions of its name: evicted first
        self.wake.set()

    def retry_after_s(self) -> float:
        """A guess at when a queue slot frees: one average request ahead, 1-60 s."""
        per_token = self.stats.mean_step_s() or 0.1
        return float(min(60.0, max(1.0, per_token * 64)))

    def abort(self, request_id: str) -> None:
        """Ask the worker to stop ``request_id`` (thread-safe, no-op when unknown)."""
        self.aborts.append(request_id)
        self.wake.set()

    def counts(self) -> tuple[int, int]:
        """``(running, waiting)``."""
        with self.lock:
            return len(self.running), len(self.waiting)

    def stop(self) -> None:
        """Stop accepting and end every request with ``abort``; the thread exits."""
        with self.lock:
            self.accepting = False
            self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=60)

    # -- the worker -------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self.lock:
                    busy = bool(self.running or self.waiting or self.aborts)
                    if self.stopping:
                        break
                if not busy:
                    self.wake.wait(timeout=1.0)
                    self.wake.clear()
                    continue
                self.wake.clear()
                try:
                    self._step()
                except Exception as exc:  # a bug: fail the running requests, keep serving
                    self.error = f"{type(exc).__name__}: {exc}"
                    self._fail_running(EngineUnavailable(
                        f"The engine failed during a forward pass ({type(exc).__name__})",
                        fix="Retry; report the server log if it persists."))
                with self.lock:
                    idle_but_waiting = bool(self.waiting) and not self.running
                if idle_but_waiting:  # waiting for loads: do not spin
                    self.wake.wait(timeout=0.05)
            self._abort_all()

    def _step(self) -> None:
        started = time.perf_counter()
        with self.step_lock:
            self._reap()
            self._start_loads()
            decoded = self._forward()
        if decoded:
            self.stats.record_step(time.perf_counter() - started)
        self._maybe_shrink_kv()
        self.cache.yield_to_loads()

    # -- reap -------------------------------------------------------------------------------

    def _reap(self) -> None:
        now = time.monotonic()
        aborted = set()
        while self.aborts:
            aborted.add(self.aborts.popleft())
        with self.lock:
            for seq in list(self.waiting):
                rid = seq.request.request_id
                if rid in aborted:
                    self._finish_waiting(seq, None)
                elif seq.load_error is not None:
                    self._finish_waiting(seq, seq.load_error)
                elif now > seq.deadline:
                    self.stats.timeouts += 1
                    self._finish_waiting(seq, Overloaded(
                        f"Request waited {self.request_timeout_s:.0f} s for a slot",
                        fix="Retry later.", retry_after_s=self.retry_after_s()))
            for seq in self.running:
                if seq.finish is None and (seq.request.request_id in aborted
                                           or now > seq.deadline):
                    if now > seq.deadline:
                        self.stats.timeouts += 1
                    seq.finish = "abort"
                    self._push(seq, [], finish="abort")
            self._compact()

    def _finish_waiting(self, seq: Sequence, error: BaseException | None) -> None:
        self.waiting.remove(seq)
        self.by_id.pop(seq.request.request_id, None)
        if error is None:
            seq.sink.push(TokenChunk([], finish_reason="abort"))
            seq.sink.close()
        else:
            seq.sink.fail(error)

    def _compact(self) -> None:
        """Drop finished rows, keeping rows compact: decoding rows first, a partial prefill last.

        After a row is freed, the last row fills the hole; if the last row is a partially
        prefilled sequence, the last decoding row fills the hole and the partial one moves just
        behind it (two prefix copies instead of one).
        """
        cache = self.runner.cache
        for seq in [s for s in self.running if s.finish is not None]:
            self.running.remove(seq)
            self.by_id.pop(seq.request.request_id, None)
            self._unpin(seq)
            seq.sink.close()
            hole, used = seq.row, len(self.running)
            if hole != used:  # row ``used`` is the last occupied one
                last = self.running[-1]
                if last.partial and hole != used - 1:
                    before = self.running[-2]  # the last decoding row, ``used - 1``
                    cache.move(before.row, hole)
                    before.row = hole
                    hole = used - 1
                cache.move(last.row, hole)
                last.row = hole
                self.running.sort(key=lambda s: s.row)
            cache.shrink(used)

    # -- loads and admission ----------------------------------------------------------------

    def _start_loads(self) -> None:
        """Start background loads for waiting requests whose adapter is not resident.

        When every slot is pinned by running sequences, the oldest request that cannot load
        would wait for as long as traffic to the resident adapters keeps them pinned. After
        ``STARVE_S`` it picks a victim, the least recently used resident adapter that has no
        waiting request older than the starving one, and new requests stop pinning it
        (`AdapterCache.draining`) until its running sequences finish and the load takes its
        slot; requests for the victim then wait their turn the same way (first come, first
        served across adapters, so two adapters cannot take each other's slot in turns).
        """
        with self.lock:
            wanted = [s for s in self.waiting if s.key is not None and s.load_error is None]
        self.cache.protected = frozenset(s.key for s in wanted)
        if self.cache.draining and all(self.cache.get(k) is None for k in self.cache.draining):
            # The drained adapter gave its slot up: the next starving request may drain another
            # (kept, this blocked every later drain, and the old victim's next load, for good).
            self.cache.draining = frozenset()
        blocked: Sequence | None = None
        oldest: dict[str, float] = {}  # adapter -> submission time of its oldest waiting request
        room = self.cache.room()  # new loads that can find a slot (more would read in vain)
        for seq in wanted:
            oldest.setdefault(seq.key, seq.submitted)
            if seq.loading or self.cache.get(seq.key) is not None:
                continue
            if not self.cache.is_loading(seq.key):
                if room <= 0:
                    blocked = blocked or seq
                    continue  # every slot pinned or wanted: wait for running sequences to end
                room -= 1
            seq.waited_for_load = seq.loading = True
            future = self.cache.start_load(seq.request.adapter)
            future.add_done_callback(lambda f, s=seq: self._load_done(s, f))
        if blocked is None and not any(s.loading for s in wanted):
            self.cache.draining = frozenset()  # kept while a load waits to take the slot
        elif (blocked is not None and not self.cache.draining
              and time.monotonic() - blocked.submitted > STARVE_S):
            since = blocked.submitted
            victim = self.cache.pick_victim(lambda key: oldest.get(key, float("inf")) > since)
            if victim is not None:
                self.cache.draining = frozenset({victim})

    def _load_done(self, seq: Sequence, future) -> None:
        seq.loading = False
        if future.cancelled():
            seq.load_error = EngineUnavailable("The engine is shutting down", fix="Retry later.")
            self.wake.set()
            return
        error = future.exception()
        if error is not None and not isinstance(error, NoRoom):
            seq.load_error = error if isinstance(error, LoradockError) else EngineUnavailable(
                f"Loading adapter {seq.key} failed ({type(error).__name__}: {error})",
                fix="Check the adapter with `loradock hub verify`.")
        elif error is None:
            seq.load_s = future.result().load_s
        self.wake.set()

    def _admit(self) -> list[tuple[Sequence, int]]:
        """Prompt chunks for this step: the partial prefill first, then new sequences.

        At most ``prefill_chunk`` prompt tokens per step, so decode rows in the same pass are
        never stalled behind a long prompt; a prompt longer than what is left stays partial (in
        the last KV row) and continues next step. A new sequence first gets the longest cached
        prefix of its prompt copied into its row (`serve.runtime.prefix_cache`), and only the
        rest counts against the budget.
        """
        budget = self.prefill_chunk
        batch: list[tuple[Sequence, int]] = []
        partial = [s for s in self.running if s.partial]
        if partial:  # finish the partial prefill before admitting anyone else
            seq = partial[0]
            n = min(budget, len(seq.request.prompt_ids) - seq.prefilled)
            batch.append((seq, n))
            budget -= n
            if seq.prefilled + n < len(seq.request.prompt_ids):
                budget = 0
        while budget > 0:
            with self.lock:
                if len(self.running) >= self.max_running:
                    break
                seq = self._next_ready()
                if seq is None:
                    break
                self.waiting.remove(seq)
                seq.row = self.runner.cache.allocate()
                self.running.append(seq)
            prompt = seq.request.prompt_ids
            if self.prefix is not None and self.prefix.enabled:
                self.runner.cache.ensure(len(prompt))
                seq.prefilled = self.prefix.restore(seq.key, prompt, seq.row)
            left = len(prompt) - seq.prefilled
            n = min(budget, left)
            batch.append((seq, n))
            budget -= n
            if n < left:
                break  # this one stays partial, in the last row
        return batch

    def _next_ready(self) -> Sequence | None:
        for seq in self.waiting:
            if seq.key is None:
                return seq
            resident = self.cache.acquire(seq.key)
            if resident is not None:
                seq.resident = resident
                return seq
        return None

    def _forward(self) -> bool:
        """One pass: every decoding row's next token and this step's prompt chunks together."""
        from serve.runtime.runner import DecodeRows

        with self.lock:
            self._compact()
        rows = [s for s in self.running if not s.partial]  # rows 0..d-1, before admission
        chunks = self._admit()
        if not rows and not chunks:
            return False
        assert all(s.row == i for i, s in enumerate(rows)), "KV rows out of order"
        decode = DecodeRows([s.pending for s in rows], [s.position for s in rows],
                            [s.slot for s in rows]) if rows else None
        prompt = [(s.row, s.request.prompt_ids[s.prefilled:s.prefilled + n], s.prefilled, s.slot)
                  for s, n in chunks]
        started, cpu = time.perf_counter(), time.process_time()
        try:
            logits = self.runner.forward(decode, prompt)
        except Exception as exc:  # noqa: BLE001 - fail only the requests the pass concerns
            self._fail_pass(rows, chunks, exc)
            return False
        elapsed = time.perf_counter() - started
        if rows:
            self.stats.decode_s += elapsed
            self.stats.decode_cpu_s += time.process_time() - cpu
            self.stats.record_batch([s.key for s in rows])
        else:
            self.stats.prefill_s += elapsed
        for seq in rows:
            seq.position += 1
        done, done_rows = [], []
        for index, (seq, n) in enumerate(chunks):
            seq.prefilled += n
            self.stats.prefill_tokens += n
            if seq.prefilled == len(seq.request.prompt_ids):
                seq.position = seq.prefilled
                self.stats.ttft.append(time.monotonic() - seq.submitted)
                if self.prefix is not None:
                    self.prefix.store(seq.key, seq.request.prompt_ids, seq.row)
                done.append(seq)
                done_rows.append(len(rows) + index)
        picked = list(range(len(rows))) + done_rows
        if picked:
            self._accept_many(rows + done, logits if len(picked) == logits.shape[0]
                              else logits[picked])
        return bool(rows)

    def _fail_pass(self, rows: list[Sequence], chunks: list[tuple[Sequence, int]],
                   exc: Exception) -> None:
        """A pass raised: fail its prompt chunks' requests (a decode-only pass: its rows)."""
        error = exc if isinstance(exc, LoradockError) else EngineUnavailable(
            f"The engine failed during a forward pass ({type(exc).__name__})",
            fix="Retry; report the server log if it persists.")
        self.error = f"{type(exc).__name__}: {exc}"
        victims = [seq for seq, _ in chunks] or rows
        for seq in victims:
            if seq.finish is None:
                self._fail(seq, error)

    def _maybe_shrink_kv(self) -> None:
        """Give KV memory back once the long sequences that grew it have left."""
        with self.step_lock, self.lock:
            longest = max((len(s.request.prompt_ids) + s.request.params.max_tokens
                           for s in self.running), default=0)
            self.runner.cache.shrink_to(longest)

    def _accept_many(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        try:
            choices = sample(logits, [s.sampler for s in seqs])
        except Exception:  # noqa: BLE001 - find the rows that fail, keep the others
            choices = []
            for i, seq in enumerate(seqs):
                try:
                    choices.extend(sample(logits[i:i + 1], [seq.sampler]))
                except Exception as exc:  # noqa: BLE001
                    choices.append(None)
                    self._fail(seq, exc if isinstance(exc, LoradockError) else EngineUnavailable(
                        f"Sampling failed ({type(exc).__name__}: {exc})",
                        fix="Check the sampling parameters."))
        for seq, choice in zip(seqs, choices, strict=True):
            if choice is None:
                continue
            params = seq.request.params
            token = choice.token_id
            if token in params.stop_token_ids:
                seq.finish = "stop"
                self._push(seq, [], finish="stop")
                continue
            seq.generated += 1
            self.stats.generated_tokens += 1
            finish = None
            if seq.generated >= params.max_tokens or seq.position + 1 >= self.runner.max_len:
                finish = "length"
            seq.pending = token
            seq.finish = finish
            self._push(seq, [token], finish=finish,
                       logprobs=[choice.logprob] if params.logprobs else None,
                       top=[choice.top_logprobs or {}] if params.top_logprobs else None)

    def _push(self, seq: Sequence, tokens: list[int], *, finish: str | None,
              logprobs: list[float] | None = None, top: list[dict[int, float]] | None = None,
              ) -> None:
        chunk = TokenChunk(list(tokens), logprobs=logprobs, top_logprobs=top,
                           finish_reason=finish)  # type: ignore[arg-type]
        if finish is not None:
            # Before the client sees the end: an unload it sends next must not find the
            # adapter still pinned by this finished row (the row itself leaves at the next
            # compaction, before any pass; it is never decoded again).
            self._unpin(seq)
        if seq.first_chunk:
            seq.first_chunk = False
            chunk.prompt_tokens = len(seq.request.prompt_ids)
            chunk.adapter_load_s = seq.load_s if seq.waited_for_load else 0.0
        if not seq.sink.push(chunk) and seq.finish is None:
            seq.finish = "abort"  # the consumer's loop is gone

    def _unpin(self, seq: Sequence) -> None:
        """Release ``seq``'s pin on its adapter, once (a finished row is never decoded again)."""
        if seq.resident is not None:
            seq.resident = None
            self.cache.release(seq.key)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        """End ``seq`` with ``error``; like a finish, its pin goes before the client hears."""
        seq.finish = "abort"
        self._unpin(seq)
        seq.sink.fail(error)

    def _fail_running(self, error: BaseException) -> None:
        with self.step_lock, self.lock:
            for seq in self.running:
                if seq.finish is None:
                    self._fail(seq, error)
            self._compact()

    def _abort_all(self) -> None:
        with self.step_lock, self.lock:
            for seq in list(self.waiting):
                self._finish_waiting(seq, None)
            for seq in self.running:
                if seq.finish is None:
                    seq.finish = "abort"
                    self._push(seq, [], finish="abort")
            self._compact()
