"""Training metrics: one JSON line per log event, and the loss curves drawn from them.

``metrics.jsonl`` lines look like::

    {"step": 10, "epoch": 0.5, "elapsed_s": 41.2, "loss": 1.83, "learning_rate": 0.0002,
     "grad_norm": 0.91}
    {"step": 10, "epoch": 0.5, "elapsed_s": 44.0, "eval_loss": 1.71}

``elapsed_s`` is training wall time since the run began and ``cpu_s`` the training process's CPU
time (steadier than wall time when other work shares the cores), resumes included: after
``--resume`` the file is cut back to the checkpoint's step (`truncate_after`) and both clocks
continue from the last kept line, so the curve and the clocks continue where the checkpoint
left them.

Where the job ends: this module records and plots; the trainer decides when to log.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
_KEYS = ("loss", "eval_loss", "learning_rate", "grad_norm", "rewards/margins",
         "rewards/accuracies", "num_tokens", "nll_loss", "log_odds_ratio", "kl")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` (missing file: empty list; a torn last line is ignored)."""
    rows: list[dict[str, Any]] = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def truncate_after(path: Path, step: int) -> dict[str, Any]:
    """Drop lines logged after ``step`` (work redone on resume); return the last kept line."""
    rows = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows[-1] if rows else {}


class MetricsLogger(TrainerCallback):
    """Append the trainer's log events to ``metrics.jsonl``.

    Args:
        path: The JSONL file (appended to).
        resumed: The last line kept from before a resume (its clocks are continued).
    """

    def __init__(self, path: Path, resumed: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.offset = float((resumed or {}).get("elapsed_s", 0.0))
        self.cpu_offset = float((resumed or {}).get("cpu_s", 0.0))
        self._start = time.monotonic()
        self._cpu_start = time.process_time()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start the clocks (model loading and data preparation are not counted)."""
        self._start = time.monotonic()
        self._cpu_start = time.process_time()

    @property
    def elapsed(self) -> float:
        """Training seconds so far, earlier runs of a resumed training included."""
        return self.offset + time.monotonic() - self._start

    @property
    def cpu(self) -> float:
        """Training CPU seconds so far (all threads), earlier runs included."""
        return self.cpu_offset + time.process_time() - self._cpu_start

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        """Write one line with the step, epoch, elapsed time and the known metrics."""
        if not getattr(state, "is_world_process_zero", True):
            return  # one writer in a distributed run
        logs = logs or {}
        row: dict[str, Any] = {
            "step": int(state.global_step),
            "epoch": round(float(state.epoch or 0.0), 4),
            "elapsed_s": round(self.elapsed, 3),
            "cpu_s": round(self.cpu, 3),
        }
        for key in _KEYS:
            value = logs.get(key)
            if isinstance(value, int | float) and math.isfinite(float(value)):
                row[key] = float(value)
            elif value is not None:
                row[key] = str(value)
        if len(row) == 4:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def plot_losses(metrics_path: Path, png_path: Path, title: str = "") -> Path:
    """Draw train and validation loss against the step into ``png_path``.

    Returns:
        ``png_path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), float)]
    val = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), float)]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#1f77b4")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", color="#d62728")
    if not train and not val:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
