"""How many CPU threads torch uses for training, and the environment that keeps them cheap.

Two facts measured on this 2-core machine shared with other work (see ``bench/train.py
--threads-sweep`` and the issue notes):

- spin-waiting OpenMP threads made steps 3-10x slower, so ``OMP_WAIT_POLICY=PASSIVE`` is set
  before torch starts (the CLI and the tests do it; `apply_threads` warns when it is missing);
- a thread only helps when a core is free for it: with other processes keeping both cores busy
  (load 3-7), the demo recipe took 15.3 s/step with one thread and 24.2 s/step with two.

So the default counts the cores that are free right now (CPUs this process may use minus the
1-minute load average, rounded), at least 1. An idle 2-core machine gets 2 threads, a busy one 1.
The count used is recorded in the manifest (``compute.torch_threads``); ``threads:`` in the
recipe overrides it.

Where the job ends: this module picks and applies a thread count; measuring belongs to bench/.
"""

from __future__ import annotations

import os
import warnings


def available_cpus() -> int:
    """CPUs this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def current_load() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def default_threads(cpus: int | None = None, load: float | None = None) -> int:
    """Threads for ``cpus`` CPUs under ``load``: the free cores, rounded, at least 1.

    Args:
        cpus: CPUs available (default: this process's affinity).
        load: Runnable processes on average (default: the 1-minute load average).
    """
    cpus = available_cpus() if cpus is None else cpus
    load = current_load() if load is None else load
    return max(1, min(cpus, int(cpus - load + 0.5)))


def apply_threads(requested: int = 0) -> int:
    """Set torch's intra-op thread count and return it.

    Args:
        requested: Threads wanted; 0 picks `default_threads`.
    """
    import torch

    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        warnings.warn(
            "OMP_WAIT_POLICY is not PASSIVE: torch threads may spin and slow training on a busy "
            "machine (set it before starting Python).",
            stacklevel=2,
        )
    threads = requested or default_threads()
    torch.set_num_threads(threads)
    return torch.get_num_threads()
