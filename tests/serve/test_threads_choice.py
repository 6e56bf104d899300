"""Threads per pass (serve.runtime.threads_choice): the rule, the cache, and equal outputs.

The rule is table-driven over step timings like the two machines seen here (one where a
second thread only pays at 32 rows, one where it always pays); the real SmolLM2 engine then
decodes the same greedy tokens whether small passes run on one thread or on all.
"""

from __future__ import annotations

import pytest

from hub.machine import MeasurementCache
from serve.runtime import threads_choice
from serve.runtime.threads_choice import ThreadPlan, ladder
from tests.serve.test_engine_peft import collect, request, run, start_engine


class _Cache:
    """The KV cache surface `measure` touches."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def shrink(self, used: int) -> None:
        pass

    def allocate(self) -> int:
        return 0

    def shrink_to(self, longest: int) -> None:
        pass


class _Runner:
    def __init__(self, rows: int) -> None:
        import torch

        self.cache = _Cache(rows)
        self.device = torch.device("cpu")


# (label, {rows: (one-thread ms, all-threads ms)}, expected single_max_rows)
CASES = [
    ("one thread wins up to 16 (AVX512-BF16 EPYC, 2 cores)",
     {1: (15.5, 24.2), 2: (17.3, 26.8), 4: (18.5, 23.4), 8: (23.4, 27.3), 16: (33.5, 35.9),
      32: (54.3, 45.1)}, 16),
    ("all threads always win", {1: (30.0, 16.0), 2: (31.0, 17.0), 4: (33.0, 18.0),
                                8: (40.0, 21.0), 16: (60.0, 30.0), 32: (90.0, 50.0)}, 0),
    ("equal within 5 %: all threads", {1: (20.0, 20.5), 2: (21.0, 21.0), 4: (22.0, 22.0),
                                       8: (23.0, 23.0), 16: (30.0, 30.0), 32: (50.0, 45.0)}, 0),
    ("stops at the first batch it loses", {1: (10.0, 20.0), 2: (30.0, 20.0), 4: (10.0, 20.0),
                                           8: (10.0, 20.0), 16: (10.0, 20.0),
                                           32: (10.0, 20.0)}, 1),
    ("one thread wins everywhere", {b: (10.0, 20.0) for b in (1, 2, 4, 8, 16, 32)}, 32),
]


@pytest.mark.parametrize(("label", "timings", "expected"), CASES, ids=[c[0] for c in CASES])
def test_thread_rule(label, timings, expected, monkeypatch):
    monkeypatch.setattr(threads_choice, "time_steps",
                        lambda runner, rows, threads: timings[rows][0 if threads == 1 else 1])
    plan = threads_choice.measure(_Runner(32), threads=2)
    assert plan.single_max_rows == expected, plan.reason
    assert plan.for_tokens(expected + 1) == 2
    if expected:
        assert plan.for_tokens(expected) == 1


def test_one_thread_in_all_measures_nothing(monkeypatch):
    monkeypatch.setattr(threads_choice, "time_steps", lambda *a: pytest.fail("timed"))
    plan = threads_choice.measure(_Runner(32), threads=1)
    assert plan.single_max_rows == 0 and plan.for_tokens(1) == 1


def test_ladder_ends_at_max_running():
    assert ladder(1) == [1]
    assert ladder(12) == [1, 2, 4, 8, 12]
    assert ladder(32) == [1, 2, 4, 8, 16, 32]


def test_plans_are_cached_and_forced_plans_are_not_measured(monkeypatch, tmp_path):
    calls = []

    def fake(runner, threads):
        calls.append(threads)
        return ThreadPlan(threads, 8, "measured", {"1": [1.0, 2.0]})

    monkeypatch.setattr(threads_choice, "measure", fake)
    cache = MeasurementCache(tmp_path)
    first = threads_choice.choose(_Runner(16), 2, ["model", "bf16"], None, cache)
    again = threads_choice.choose(_Runner(16), 2, ["model", "bf16"], None, cache)
    assert (first.single_max_rows, again.single_max_rows, again.cached) == (8, 8, True)
    assert calls == [2], "the second start reads the cache"
    other = threads_choice.choose(_Runner(16), 2, ["model", "fp32"], None, cache)
    assert calls == [2, 2] and other.single_max_rows == 8, "another dtype is measured anew"
    forced = threads_choice.choose(_Runner(16), 2, ["model", "bf16"], 0, cache)
    assert forced.single_max_rows == 0 and "forced" in forced.reason and calls == [2, 2]


def test_small_passes_on_one_thread_decode_the_same_tokens(base_info, prompts):
    """Greedy fp32 output of a 3-row batch and a single stream, one thread vs all threads."""
    results = []
    for rows in (0, 64):  # 0: every pass on all threads; 64: every pass here on one thread
        engine = start_engine(base_info, max_running=4, threads=2,
                              options={"single_thread_rows": rows})
        try:
            plan = engine._runner.thread_plan
            assert plan.single_max_rows == rows and "forced" in plan.reason
            assert "forced" in engine.health().detail

            async def go(engine=engine):
                import asyncio

                batch = await asyncio.gather(*(collect(engine, request(p, max_tokens=12))
                                               for p in (*prompts, prompts[0])))
                single = await collect(engine, request(prompts[1], max_tokens=12))
                return [tokens for tokens, _ in batch] + [single[0]]

            results.append(run(go()))
        finally:
            run(engine.shutdown(drain_timeout_s=5))
    assert results[0] == results[1]
    assert all(len(tokens) > 0 for tokens in results[0])


def test_a_real_measurement_times_every_batch_and_leaves_the_kv_cache_as_it_was(
        base_info, monkeypatch, tmp_path):
    monkeypatch.setenv("LORADOCK_CACHE", str(tmp_path))  # nothing cached: measured now
    engine = start_engine(base_info, max_running=2, threads=2, options={"kv_initial_len": 64})
    try:
        plan = engine._runner.thread_plan
        assert not plan.cached and set(plan.timings) <= {"1", "2"} and "1" in plan.timings
        assert all(ms > 0 for pair in plan.timings.values() for ms in pair)
        assert plan.single_max_rows in (0, 1, 2)
        cache = engine._runner.cache
        assert cache.capacity == 64 and cache.lengths == [0, 0]
    finally:
        run(engine.shutdown(drain_timeout_s=5))
