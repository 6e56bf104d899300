"""Prometheus metrics in the text exposition format (version 0.0.4), written without a client lib.

Counters and histograms are updated by the request handlers; gauges (queue depth, running
requests, resident adapters) are read from `Engine.health` when ``/metrics`` is scraped. Labels
never carry adapter names, prompts or keys: only the route template and the status code.

Where the job ends: counting and rendering. What counts as a request, a token or a load is
decided by the callers.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

from serve.engine import EngineHealth

PREFIX = "loradock"
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STATUSES = ("starting", "ok", "draining", "failed")


@dataclass
class Histogram:
    """A cumulative histogram with fixed upper bounds."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        """Record one value."""
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        """The ``_bucket``, ``_sum`` and ``_count`` samples."""
        pairs = zip(self.buckets, self.counts, strict=True)
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in pairs]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_num(self.total)}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """The server's counters and histograms (thread-safe; cheap to update)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.client_disconnects = 0
        self.timeouts = 0
        self.json_invalid = 0
        self.adapter_load = Histogram(LOAD_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.adapter_load_by_key: dict[str, float] = {}

    def count_request(self, route: str, status: int) -> None:
        """One finished HTTP request."""
        with self._lock:
            self.requests[(route, str(status))] += 1

    def count_tokens(self, prompt: int, completion: int) -> None:
        """Tokens of one finished generation."""
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def observe_ttft(self, seconds: float) -> None:
        """Time from request arrival to the first generated token."""
        with self._lock:
            self.ttft.observe(seconds)

    def observe_adapter_load(self, seconds: float, key: str | None = None) -> None:
        """One adapter load (lazy on a request, or through the admin route) of ``NAME@V``."""
        with self._lock:
            self.adapter_load.observe(seconds)
            if key is not None:  # the latest load per version, for the console (never a label)
                self.adapter_load_by_key[key] = seconds

    def count_event(self, name: str) -> None:
        """Increment ``client_disconnects``, ``timeouts`` or ``json_invalid``."""
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def render(self, health: EngineHealth) -> str:
        """The full exposition text for one scrape."""
        p = PREFIX
        with self._lock:
            out = [
                f"# HELP {p}_requests_total HTTP requests by route and status code.",
                f"# TYPE {p}_requests_total counter",
            ]
            for (route, status), value in sorted(self.requests.items()):
                labels = f'route="{_label(route)}",status="{status}"'
                out.append(f"{p}_requests_total{{{labels}}} {value}")
            for name, value, text in (
                ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
                ("completion_tokens_total", self.completion_tokens, "Tokens generated."),
                ("client_disconnects_total", self.client_disconnects,
                 "Requests whose client went away before the end (slot freed)."),
                ("request_timeouts_total", self.timeouts, "Requests stopped by the timeout."),
                ("json_invalid_total", self.json_invalid,
                 "json_object responses whose text did not parse as a JSON object."),
            ):
                out += [f"# HELP {p}_{name} {text}", f"# TYPE {p}_{name} counter",
                        f"{p}_{name} {value}"]
            for name, value, text in (
                ("queue_depth", health.waiting, "Requests waiting for a batch slot."),
                ("running_requests", health.running, "Sequences being decoded."),
                ("adapters_resident", len(health.resident_adapters), "Adapters loaded in memory."),
            ):
                out += [f"# HELP {p}_{name} {text}", f"# TYPE {p}_{name} gauge",
                        f"{p}_{name} {value}"]
            out += [f"# HELP {p}_engine_status Engine state (1 for the current one).",
                    f"# TYPE {p}_engine_status gauge"]
            out += [f'{p}_engine_status{{status="{s}"}} {int(health.status == s)}'
                    for s in _STATUSES]
            out += [f"# HELP {p}_adapter_load_seconds Time to make an adapter resident.",
                    f"# TYPE {p}_adapter_load_seconds histogram"]
            out += self.adapter_load.lines(f"{p}_adapter_load_seconds")
            out += [f"# HELP {p}_time_to_first_token_seconds From arrival to the first token.",
                    f"# TYPE {p}_time_to_first_token_seconds histogram"]
            out += self.ttft.lines(f"{p}_time_to_first_token_seconds")
        return "\n".join(out) + "\n"


def _num(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{int(value)}.0"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
