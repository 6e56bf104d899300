"""The adapter cache's load bookkeeping, on a stand-in LoRA stack (no model, no files).

What is checked here is residency logic only: how many loads can find a slot (`room`), that a
load which lost its slot keeps what it read, and that a load waiting for the step lock gets it
between steps (`yield_to_loads`). Real adapters through the real stack are served in
`tests/serve/test_engine_peft.py` and `test_engine_scheduling.py`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from serve.runtime.adapter_cache import AdapterCache, NoRoom


@dataclass
class Record:
    name: str
    version: int = 1


@dataclass
class Weights:
    name: str
    nbytes: int = 10


class Stack:
    """Slots by number; a snapshot of a slot is what was installed there."""

    def __init__(self) -> None:
        self.slots: dict[int, Weights] = {}

    def install(self, weights: Weights) -> int:
        slot = next(i for i in range(100) if i not in self.slots)
        self.slots[slot] = weights
        return slot

    def restore(self, copy: Weights) -> int:
        return self.install(copy)

    def snapshot(self, slot: int) -> Weights:
        return self.slots[slot]

    def clear(self, slot: int) -> None:
        del self.slots[slot]


def make_cache(capacity: int = 1, host: int = 0):
    reads: list[str] = []

    def reader(record: Record) -> Weights:
        reads.append(record.name)
        return Weights(record.name)

    cache = AdapterCache(Stack(), capacity, reader, threading.Lock(), host_capacity=host)
    return cache, reads


def test_room_counts_free_and_idle_slots_less_loads_in_flight():
    cache, _ = make_cache(capacity=2)
    try:
        assert cache.room() == 2
        cache.start_load(Record("a")).result()
        assert cache.room() == 2  # a is resident but idle: it could be evicted
        assert cache.acquire("a@1") is not None
        assert cache.room() == 1  # pinned by a running sequence
        with cache.step_lock:  # the load of b waits for the step: it is in flight
            future = cache.start_load(Record("b"))
            assert cache.room() == 0
        future.result()
        assert cache.room() == 1  # a pinned, b idle
        cache.release("a@1")
        assert cache.room() == 2
    finally:
        cache.close()


def test_a_load_that_lost_its_slot_keeps_what_it_read():
    cache, reads = make_cache(capacity=1)
    try:
        cache.start_load(Record("a")).result()
        cache.acquire("a@1")  # every slot pinned: b's read cannot be installed
        with pytest.raises(NoRoom):
            cache.start_load(Record("b")).result()
        cache.release("a@1")
        cache.start_load(Record("b")).result()
        assert reads == ["a", "b"]  # the retry installed the weights read the first time
        assert cache.get("b@1") is not None
    finally:
        cache.close()


def test_a_host_copy_survives_a_lost_slot():
    cache, reads = make_cache(capacity=1, host=2)
    try:
        cache.start_load(Record("a")).result()
        cache.start_load(Record("b")).result()  # evicts a into host memory
        cache.acquire("b@1")
        with pytest.raises(NoRoom):
            cache.start_load(Record("a")).result()
        cache.release("b@1")
        cache.start_load(Record("a")).result()
        assert reads == ["a", "b"] and cache.host_hits == 1
    finally:
        cache.close()


def test_a_waiting_load_installs_between_steps():
    cache, _ = make_cache(capacity=1)
    try:
        cache.step_lock.acquire()  # a step is running
        future = cache.start_load(Record("a"))
        deadline = time.monotonic() + 10
        while cache._installs_waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.001)  # the read is done; the load now waits for the step lock
        cache.step_lock.release()  # the step ends ...
        cache.yield_to_loads(timeout_s=10)  # ... and the scheduler lets the load in first,
        with cache.step_lock:  # so the next step finds it resident
            assert cache.get("a@1") is not None
        assert future.result(timeout=10).slot == 0
        started = time.monotonic()
        cache.yield_to_loads(timeout_s=10)  # nothing waiting: returns at once
        assert time.monotonic() - started < 5
    finally:
        cache.close()


def test_a_superseded_version_is_evicted_first_and_leaves_no_host_copy():
    cache, reads = make_cache(capacity=2, host=4)
    try:
        cache.start_load(Record("a", 1)).result()
        cache.start_load(Record("b", 1)).result()  # a@1 is now the least recently used
        cache.note_version(Record("b", 2))  # a request asks for b's newer version
        cache.start_load(Record("b", 2)).result()
        assert cache.keys() == ["a@1", "b@2"]  # b@1 went, though a@1 was older
        assert list(cache._host) == []  # and kept no host copy: nobody asks for it again
        cache.start_load(Record("c", 1)).result()  # a plain LRU eviction keeps a copy
        assert list(cache._host) == ["a@1"]
        assert cache.pick_victim(lambda key: True) == "b@2"  # LRU when nothing is superseded
        cache.note_version(Record("c", 2))
        assert cache.pick_victim(lambda key: True) == "c@1"  # superseded first
        cache.start_load(Record("b", 1)).result()  # asked for explicitly: still loads
        assert reads == ["a", "b", "b", "c", "b"]
    finally:
        cache.close()


def test_a_newer_version_drops_the_host_copies_of_older_ones():
    cache, reads = make_cache(capacity=1, host=4)
    try:
        cache.start_load(Record("a", 1)).result()
        cache.start_load(Record("b", 1)).result()  # a@1 goes to host memory
        cache.note_version(Record("a", 1))  # an older or equal version changes nothing
        assert list(cache._host) == ["a@1"]
        cache.note_version(Record("a", 2))
        assert list(cache._host) == []
    finally:
        cache.close()
