"""Which adapters are resident: lazy loads, LRU eviction, pinning while requests are in flight.

Each adapter version is a key ``NAME@V``; a newly registered version is a new key, so the next
request that resolves to it simply loads it (no restart, no invalidation). At most ``capacity``
adapters are resident, each in one `serve.runtime.lora.LoraStack` slot. Loading reads the files
on a background thread (the scheduler keeps decoding meanwhile), then installs the tensors into
a free slot, or the slot of the least recently used adapter that no running sequence pins.
Pinned adapters are never evicted; unloading one raises `hub.errors.Conflict`. Adapters that
waiting requests need are not evicted either (``protected``), so loads cannot thrash.

Host tier (LoRAX's and S-LoRA's idea, on CPU): an evicted adapter's pool rows are kept in host
memory for the ``host_capacity`` most recently evicted ones, so reloading it is a copy of a few
MB under the step lock instead of reading, checking and converting its files again (the files
were verified on the first load; a version never changes, see `hub.store`).

Superseded versions go first. Once a request for (or a load of) ``NAME@V`` arrives, older
versions of ``NAME`` are *superseded*: requests for ``NAME`` resolve to the newest version, so
an older one is rarely asked for again. Host copies of superseded versions are dropped at once,
a superseded version leaves no host copy when it is evicted, and it is the first victim both for
a new load (`AdapterCache._make_room`) and for the scheduler's drain (`AdapterCache.pick_victim`:
draining it strands no one). Asked for explicitly, a superseded version still loads, from its
files. (Under ``bench/serve_load.py``, one new version a second, LRU alone filled the host tier
with versions nobody asked for again; see docs/architecture.md.)

Locks: ``lock`` (this cache's state) is always taken after ``step_lock`` (the scheduler's
forward pass), so installing weights never races a forward pass that reads the stack. The
step lock is handed over, not fought for: the scheduler takes it again right after releasing
it, so a load waiting for it could wait many steps (measured under 64 clients: 23.8 s of lock
waits against 3.1 s of reading for 47 loads). A load that has read its files counts itself
waiting, and the scheduler, between steps, lets it install first (`yield_to_loads`).

Where the job ends: this module owns slots and residency. Reading files is
`serve.runtime.adapter_files`; what runs when is the scheduler's job.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hub.errors import Conflict
from hub.names import parse_adapter_ref
from serve.engine import adapter_key

if TYPE_CHECKING:
    from hub.store import AdapterRecord
    from serve.runtime.lora import AdapterCopy, AdapterWeights, LoraStack


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, inflating RSS).

    Called when an adapter is unloaded on request, not after each load: a load's freed file
    bytes and fp32 copies are reused by the next load from the loader thread's heap (trimming
    after every load made the next one fault its pages in again: 36-56 ms per rank-16
    all-linear load instead of 17-35 ms here).
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class NoRoom(Conflict):
    """Every slot holds an adapter with requests in flight (the caller may retry later)."""


@dataclass
class Resident:
    """A resident adapter.

    Attributes:
        key: ``NAME@V``.
        record: Its store record.
        slot: Its LoRA stack slot.
        load_s: Seconds the load took (reading files and installing).
        nbytes: Bytes of its unpadded LoRA tensors.
        pins: Running sequences using it.
    """

    key: str
    record: AdapterRecord
    slot: int
    load_s: float
    nbytes: int
    pins: int = 0


class AdapterCache:
    """LRU set of resident adapters backed by a `LoraStack`."""

    def __init__(
        self,
        stack: LoraStack,
        capacity: int,
        reader: Callable[[AdapterRecord], AdapterWeights],
        step_lock: threading.Lock,
        on_loaded: Callable[[], None] | None = None,
        host_capacity: int = 0,
    ) -> None:
        """Create an empty cache.

        Args:
            stack: Where weights are installed (its pools hold ``capacity`` adapters each).
            capacity: Adapters resident at once.
            reader: Reads a record's files into weights (runs on the loader thread).
            step_lock: Held by the scheduler around each forward pass.
            on_loaded: Called (on the loader thread) after each load finishes or fails.
            host_capacity: Evicted adapters kept in host memory for fast reloads (0: none).
        """
        self.stack = stack
        self.capacity = capacity
        self.reader = reader
        self.step_lock = step_lock
        self.on_loaded = on_loaded
        self.lock = threading.RLock()
        self._resident: OrderedDict[str, Resident] = OrderedDict()  # least recent first
        self._loading: dict[str, Future[Resident]] = {}
        self.host_capacity = host_capacity
        self._host: OrderedDict[str, AdapterCopy] = OrderedDict()  # least recent first
        # Read but not installed (every slot was taken meanwhile): kept for the retry.
        self._unplaced: OrderedDict[str, AdapterWeights] = OrderedDict()
        self.host_hits = 0
        self._newest: dict[str, int] = {}  # adapter name -> newest version asked for or loaded
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load")
        # Keys that waiting requests need: not evicted, so a fresh load is not thrown out before
        # its requests are admitted (replaced as a whole by the scheduler each step).
        self.protected: frozenset[str] = frozenset()
        # Adapters no new request may pin, so that their slot frees for a starving load (set by
        # the scheduler; see `Scheduler._start_loads`).
        self.draining: frozenset[str] = frozenset()
        self.loads = 0
        self.evictions = 0
        self.load_s_total = 0.0
        self._installs_waiting = 0  # loads that have read their files, waiting for step_lock
        self._installed = threading.Event()

    # -- queries ----------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Resident keys, least recently used first."""
        with self.lock:
            return list(self._resident)

    def get(self, key: str) -> Resident | None:
        """The resident entry for ``key`` (no LRU update)."""
        with self.lock:
            return self._resident.get(key)

    def is_loading(self, key: str) -> bool:
        """True while a load of ``key`` is in flight."""
        with self.lock:
            return key in self._loading

    def room(self) -> int:
        """Loads that could find a slot now.

        Free slots and idle adapters to evict, less the loads already in flight (each will
        take one).
        """
        with self.lock:
            free = self.capacity - len(self._resident)
            idle = sum(1 for r in self._resident.values() if self._evictable(r))
            return free + idle - len(self._loading)

    def _evictable(self, entry: Resident) -> bool:
        return entry.pins == 0 and (entry.key not in self.protected
                                    or entry.key in self.draining)

    def _superseded(self, entry: Resident) -> bool:
        record = entry.record
        return record.version < self._newest.get(record.name, record.version)

    def _by_preference(self) -> list[Resident]:
        """Resident adapters in eviction order: superseded versions, then least recently used."""
        return sorted(self._resident.values(), key=lambda e: not self._superseded(e))  # stable

    def pick_victim(self, eligible: Callable[[str], bool]) -> str | None:
        """The resident adapter to drain that ``eligible`` accepts (or None).

        A superseded version first (no new request pins it, so its slot frees soonest and no
        one waits for it), else the least recently used.
        """
        with self.lock:
            return next((e.key for e in self._by_preference() if eligible(e.key)), None)

    # -- pins -------------------------------------------------------------------------------

    def acquire(self, key: str) -> Resident | None:
        """Pin ``key`` for a running sequence; None if it is not resident."""
        with self.lock:
            entry = self._resident.get(key)
            if entry is not None and key in self.draining:
                return None
            if entry is not None:
                entry.pins += 1
                self._resident.move_to_end(key)
            return entry

    def release(self, key: str) -> None:
        """Unpin ``key`` (its sequence finished)."""
        with self.lock:
            entry = self._resident.get(key)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
                self._resident.move_to_end(key)

    # -- loading and eviction ---------------------------------------------------------------

    def warm(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the loader thread now and wait (the engine's start-up warm-up)."""
        self._executor.submit(work).result()

    def start_load(self, record: AdapterRecord) -> Future[Resident]:
        """Load ``record`` in the background unless resident or already loading."""
        key = adapter_key(record)
        with self.lock:
            entry = self._resident.get(key)
            if entry is not None:
                done: Future[Resident] = Future()
                done.set_result(entry)
                return done
            self._note_version(record)
            future = self._loading.get(key)
            if future is None:
                future = self._executor.submit(self._load, record)
                self._loading[key] = future
            return future

    def note_version(self, record: AdapterRecord) -> None:
        """Remember the newest version of ``record.name``; drop host copies it supersedes.

        Called by `start_load` and by the scheduler for each request it is given, so a version
        is known superseded as soon as a request asks for a newer one (before that one loads).
        """
        with self.lock:
            self._note_version(record)

    def _note_version(self, record: AdapterRecord) -> None:
        newest = self._newest.get(record.name)
        if newest is not None and record.version <= newest:
            return
        self._newest[record.name] = record.version
        own = adapter_key(record)
        for key in [k for k in self._host if k != own and parse_adapter_ref(k)[0] == record.name]:
            del self._host[key]  # every other version of the name is older

    def _load(self, record: AdapterRecord) -> Resident:
        key = adapter_key(record)
        started = time.perf_counter()
        try:
            with self.lock:
                copy = self._host.pop(key, None)
                weights = self._unplaced.pop(key, None)
            if copy is None and weights is None:
                weights = self.reader(record)
            with self.lock:
                self._installs_waiting += 1
            try:
                with self.step_lock, self.lock:
                    self._installs_waiting -= 1
                    try:
                        return self._install(key, record, copy, weights, started)
                    except NoRoom:  # the slot went to new requests: keep what was read
                        self._keep_for_retry(key, copy, weights)
                        raise
            finally:
                self._installed.set()  # after the step lock is released
        finally:
            with self.lock:
                self._loading.pop(key, None)
            if self.on_loaded is not None:
                self.on_loaded()

    def _install(self, key: str, record: AdapterRecord, copy: AdapterCopy | None,
                 weights: AdapterWeights | None, started: float) -> Resident:
        """Put a read adapter (or its host copy) into a slot; under both locks."""
        self._make_room(key)
        if copy is not None:
            slot, nbytes = self.stack.restore(copy), copy.nbytes
            self.host_hits += 1
        else:
            slot, nbytes = self.stack.install(weights), weights.nbytes
        load_s = time.perf_counter() - started
        entry = Resident(key, record, slot, load_s, nbytes)
        self._resident[key] = entry
        self.loads += 1
        self.load_s_total += load_s
        return entry

    def _keep_for_retry(self, key: str, copy: AdapterCopy | None,
                        weights: AdapterWeights | None) -> None:
        """A host copy goes back to the host tier; read weights wait in ``_unplaced``."""
        if copy is not None:
            self._host[key] = copy
            return
        self._unplaced[key] = weights
        while len(self._unplaced) > self.capacity:
            self._unplaced.popitem(last=False)

    def yield_to_loads(self, timeout_s: float = 0.2) -> None:
        """Between steps (``step_lock`` free): wait while a read load installs itself.

        Called by the scheduler after each step. Without it the scheduler, taking the step
        lock again at once, keeps winning it, and loads wait for steps on end.
        """
        self._installed.clear()
        with self.lock:
            waiting = self._installs_waiting
        if waiting:
            self._installed.wait(timeout_s)

    def _make_room(self, key: str) -> None:
        if len(self._resident) < self.capacity:
            return
        for victim in self._by_preference():
            if self._evictable(victim):
                self._evict(victim)
                return
        raise NoRoom(
            f"Cannot load adapter {key}: all {self.capacity} adapter slots hold adapters with "
            "requests in flight or waiting",
            fix="Retry when requests finish, or start the server with a larger --max-adapters.",
        )

    def _evict(self, entry: Resident, keep_host: bool = True) -> None:
        if keep_host and self.host_capacity > 0 and not self._superseded(entry):
            self._host[entry.key] = self.stack.snapshot(entry.slot)
            while len(self._host) > self.host_capacity:
                self._host.popitem(last=False)
        self.stack.clear(entry.slot)
        del self._resident[entry.key]
        self.evictions += 1

    def unload(self, key: str) -> bool:
        """Evict ``key`` now (no host copy kept).

        Returns:
            False if it was not resident.

        Raises:
            Conflict: Requests using it are in flight.
        """
        with self.step_lock, self.lock:
            entry = self._resident.get(key)
            if entry is None:
                return False
            if entry.pins:
                raise Conflict(
                    f"Adapter {key} has {entry.pins} request(s) in flight",
                    fix="Retry when they finish.",
                    param="name",
                )
            self._evict(entry, keep_host=False)  # asked for: its memory is given back
        _trim_heap()
        return True

    def close(self) -> None:
        """Stop the loader thread (pending loads are cancelled)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
