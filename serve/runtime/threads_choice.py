"""Threads per pass by measurement: small passes may run faster on one thread than on all.

A decode step at a small batch is a few hundred short ops and matrix-vector products that are
bound by memory bandwidth. Waking the other OpenMP threads for each op (``OMP_WAIT_POLICY=
PASSIVE``, which this project needs on busy cores) can then cost more than the second core
gives. Measured on a 2-core AMD EPYC (AVX512-BF16, no AMX), SmolLM2-135M in bf16, one decode
step (position 64, ms, one thread / two threads): batch 1 15.5 / 24.2, batch 4 18.5 / 23.4,
batch 16 33.5 / 34.9, batch 32 54.3 / 45.1. Whether and up to which batch this holds depends on
the CPU, the model and the dtype, so it is measured, not assumed:

At start, after the warm-up, the runner's own decode step (base rows, no LoRA) is timed at
batches 1, 2, 4, 8, 16, 32, ... up to ``max_running``, on one thread and on all of them,
alternating, best of a few steps each. `ThreadPlan.single_max_rows` is the largest batch up to
which one thread was faster at every measured batch (0: never). The runner then runs each pass
whose token count is at most that on one thread, and every other pass on all threads. The
result is cached like the dtype choice (per CPU flags, torch version, threads and what
identifies the model and its dtype), so later starts on the machine skip the measurement;
``single_thread_rows`` in the engine options forces it.

Where the job ends: this module measures and holds the plan; the runner applies it per pass
(`serve.runtime.runner.ModelRunner.forward`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from hub.machine import MeasurementCache, cpu_flags

if TYPE_CHECKING:
    from serve.runtime.runner import ModelRunner

log = logging.getLogger("loradock.serve")

CACHE_VERSION = 1
# One thread must be at least this much faster at a batch to take that batch.
MIN_SPEEDUP = 1.05
POSITION = 64
STEPS = 4


@dataclass
class ThreadPlan:
    """How many torch threads each pass uses (see the module docstring).

    Attributes:
        threads: The engine's thread count (all passes above ``single_max_rows``).
        single_max_rows: Passes with at most this many tokens run on one thread (0: none).
        reason: What was measured (logged, shown in ``/health``).
        timings: ``{batch: [one-thread ms, all-threads ms]}`` as measured.
    """

    threads: int
    single_max_rows: int = 0
    reason: str = ""
    timings: dict[str, list[float]] | None = None
    cached: bool = False

    def for_tokens(self, tokens: int) -> int:
        """Threads for a pass over ``tokens`` tokens."""
        return 1 if tokens <= self.single_max_rows else self.threads


def ladder(max_rows: int) -> list[int]:
    """Batches to time: powers of two up to ``max_rows``, and ``max_rows`` itself."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return [*out, max_rows]


def time_steps(runner: ModelRunner, rows: int, threads: int) -> float:
    """Best milliseconds of a base decode step at ``rows`` rows on ``threads`` threads."""
    import torch

    from serve.runtime.runner import DecodeRows

    decode = DecodeRows([7] * rows, [POSITION] * rows, [-1] * rows)
    torch.set_num_threads(threads)
    best = float("inf")
    for _ in range(STEPS + 1):
        started = time.perf_counter()
        runner.forward(decode, [])
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def measure(runner: ModelRunner, threads: int) -> ThreadPlan:
    """Time decode steps on one and on ``threads`` threads; the plan that follows from it."""
    import torch

    plan = ThreadPlan(threads, timings={})
    if threads <= 1:
        plan.reason = "one thread in all"
        return plan
    cache = runner.cache
    cache.shrink(0)
    for _ in range(cache.rows):
        cache.allocate()
    try:
        with torch.inference_mode():
            # Not timed: the first passes on a shrunk team are slower, and right after start
            # all-thread passes ran ~1.5x slower for a while (measured 38.8 ms against 26.3 ms
            # a few seconds later at batch 1 on a 2-core AMD EPYC), which made one thread look
            # faster up to batch 8-32 and the server slower all run.
            time_steps(runner, 1, 1)
            for rows in ladder(cache.rows):
                time_steps(runner, rows, threads)
            for rows in ladder(cache.rows):
                one = time_steps(runner, rows, 1)
                every = time_steps(runner, rows, threads)
                one, every = min(one, time_steps(runner, rows, 1)), min(
                    every, time_steps(runner, rows, threads))
                plan.timings[str(rows)] = [round(one, 2), round(every, 2)]
                if one * MIN_SPEEDUP > every:
                    break
                plan.single_max_rows = rows
    finally:
        torch.set_num_threads(threads)
        cache.shrink(0)
        cache.shrink_to(0)  # back to the initial KV length (the steps ran at POSITION)
    shown = ", ".join(f"{b}: {t[0]:.1f}/{t[1]:.1f}" for b, t in plan.timings.items())
    plan.reason = (f"passes of <= {plan.single_max_rows} tokens on one thread (decode step ms, "
                   f"1/{threads} threads, by batch: {shown})")
    return plan


def choose(runner: ModelRunner, threads: int, model_id: Any, forced: int | None,
           cache: MeasurementCache) -> ThreadPlan:
    """The plan for ``runner``: forced, cached, or measured now (and cached).

    Args:
        runner: The built runner (weights fused, LoRA pools allocated).
        threads: The engine's torch threads.
        model_id: What identifies the weights and their dtype/kernel (JSON-serialisable).
        forced: ``single_thread_rows`` from the options (None: measure).
        cache: Where plans are cached.
    """
    import torch

    if forced is not None:
        return ThreadPlan(threads, forced if threads > 1 else 0,
                          f"passes of <= {forced} tokens on one thread (forced)")
    if runner.device.type != "cpu":
        return ThreadPlan(threads, 0, "not CPU")
    key = cache.key(CACHE_VERSION, cpu_flags(), torch.__version__, threads, runner.cache.rows,
                    model_id)
    cached = cache.read_as(key, ThreadPlan)
    if cached is not None:
        return cached
    plan = measure(runner, threads)
    if not cache.write(key, asdict(plan)):
        log.warning("could not cache the thread plan")
    return plan
