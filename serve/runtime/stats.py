"""Counters the scheduler keeps for health, metrics, tests and benchmarks.

Plain numbers, updated by the worker thread only (reads from other threads may be one step
stale). ``mixed_steps`` and ``max_adapters_in_step`` show that requests for different adapters
really shared decode passes.

Where the job ends: counting. Exposing them (``/metrics``) is the HTTP layer's job.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """What the engine has done since it started.

    Attributes:
        steps: Decode passes run.
        decode_rows: Rows over all decode passes (``decode_rows / steps`` = mean batch).
        generated_tokens: Tokens sampled (stop tokens excluded).
        prefill_tokens: Prompt tokens run.
        mixed_steps: Decode passes whose rows used two or more different adapters (the bare base
            counts as one).
        max_adapters_in_step: Most distinct adapters (base included) in one decode pass.
        max_batch: Most rows in one decode pass.
        rejected: Requests refused because the queue was full.
        timeouts: Requests that passed their deadline.
        prefill_s: Seconds spent in prefill passes.
        decode_s: Seconds spent in decode passes (``decode_rows / decode_s`` = decode tokens/s).
        decode_cpu_s: Process CPU seconds during decode passes (steadier than wall time when
            other processes share the cores).
        ttft: Recent times from submission to first token, in seconds.
        step_s: Recent decode step durations, in seconds.
    """

    steps: int = 0
    decode_rows: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    mixed_steps: int = 0
    max_adapters_in_step: int = 0
    max_batch: int = 0
    rejected: int = 0
    timeouts: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_cpu_s: float = 0.0
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    step_s: deque[float] = field(default_factory=lambda: deque(maxlen=200))

    def record_batch(self, keys: list[str | None]) -> None:
        """Count one decode pass over rows using adapters ``keys`` (None: base)."""
        distinct = len(set(keys))
        self.steps += 1
        self.decode_rows += len(keys)
        self.max_batch = max(self.max_batch, len(keys))
        self.max_adapters_in_step = max(self.max_adapters_in_step, distinct)
        if distinct > 1:
            self.mixed_steps += 1

    def record_step(self, seconds: float) -> None:
        """Remember one step's duration."""
        self.step_s.append(seconds)

    def mean_step_s(self) -> float:
        """Mean recent step duration (0 before the first step)."""
        return sum(self.step_s) / len(self.step_s) if self.step_s else 0.0

    def snapshot(self) -> dict[str, float]:
        """Numbers for ``/metrics`` (names without prefix)."""
        ttft = sorted(self.ttft)
        return {
            "steps": self.steps,
            "decode_rows": self.decode_rows,
            "generated_tokens": self.generated_tokens,
            "prefill_tokens": self.prefill_tokens,
            "mixed_steps": self.mixed_steps,
            "max_adapters_in_step": self.max_adapters_in_step,
            "max_batch": self.max_batch,
            "rejected": self.rejected,
            "timeouts": self.timeouts,
            "mean_step_s": self.mean_step_s(),
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "decode_cpu_s": self.decode_cpu_s,
            "ttft_p50_s": ttft[len(ttft) // 2] if ttft else 0.0,
        }
