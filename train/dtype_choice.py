"""Pick the CPU compute dtype for QLoRA training by measurement: float32 or bfloat16.

CPUs differ: on one machine of this project bf16 matmuls ran 7-10x slower than fp32 (AVX2, no
native bf16); on this one (AVX512-BF16, no AMX) they ran ~2.8x faster. So nothing is assumed.
With ``compute_dtype: auto`` (the default) a CPU run times the base's own projection shapes
(q, k, v, o, gate, up, down, and the LM head) at a training-sized batch of rows, forward and
input-gradient products, in float32 and in bfloat16, and takes bfloat16 only when it is at least
``MIN_SPEEDUP`` faster. CUDA always trains in bfloat16 (the QLoRA recipe's choice).

The serving engine makes the same kind of measurement for decoding (``serve.runtime.dtype_choice``:
decode-sized batches, plus a top-1 agreement probe); training keeps its own small chooser
because its shapes differ (hundreds of rows per matmul, a backward pass) and the stages do not
import each other. Both cache per (CPU flags, torch version, threads, shapes) so the timing runs
once per machine. Quality is not gated here: the loss is computed in float32 either way
(`train.lm_loss`), LoRA weights and optimizer states stay float32 (autocast), and evaluation
after training runs on its own dtype.

With bf16 chosen, causal attention forward + backward is timed the same way in both dtypes
and the faster one recorded as ``attention`` (`train.attention_dtype` applies float32).

The choice and its numbers go into the manifest (``compute.dtype_choice``).

Where the job ends: this module returns a choice; loading the model in it is `train.quant`'s.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hub.machine import Geometry, MeasurementCache, cache_root, cpu_flags

MIN_SPEEDUP = 1.10
ROWS = 512  # a batch of 8 rows of ~64 tokens, the demo's shape
DTYPES = ("float32", "bfloat16")


@dataclass
class DtypeChoice:
    """The compute dtype a run uses and why (recorded in the manifest)."""

    dtype: str  # "float32" or "bfloat16"
    reason: str
    float32_ms: float | None = None
    bfloat16_ms: float | None = None
    cached: bool = False
    attention: str | None = None  # with bf16 compute: the faster attention dtype (measured)
    attention_float32_ms: float | None = None
    attention_bfloat16_ms: float | None = None

    def record(self) -> dict[str, Any]:
        """The manifest's ``compute.dtype_choice``."""
        return asdict(self)


def model_shapes(config: Any) -> list[tuple[int, int]]:
    """``[(out, in)]`` of one decoder layer's projections and the LM head, from an HF config."""
    g = Geometry.of(config)
    return [(g.q, g.hidden), (g.kv, g.hidden), (g.kv, g.hidden), (g.hidden, g.q),
            (g.intermediate, g.hidden), (g.intermediate, g.hidden), (g.hidden, g.intermediate),
            (g.vocab // 4, g.hidden)]  # a quarter: the labelled share of the head


def time_training_matmuls(shapes: list[tuple[int, int]], dtype: Any, rows: int = ROWS,
                          repeats: int = 3) -> float:
    """Milliseconds of ``y = x W^T`` and ``dx = dy W`` over ``shapes``, best of ``repeats``."""
    import torch

    weights = [torch.randn(o, i, dtype=dtype) * 0.02 for o, i in shapes]
    inputs = [torch.randn(rows, i, dtype=dtype) for _, i in shapes]
    grads = [torch.randn(rows, o, dtype=dtype) for o, _ in shapes]
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up the kernels
        started = time.perf_counter()
        for w, x, g in zip(weights, inputs, grads, strict=True):
            torch.nn.functional.linear(x, w)
            torch.mm(g, w)
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def time_attention(config: Any, dtype: Any, repeats: int = 3) -> float:
    """Milliseconds of causal SDPA forward + backward at a training batch (8 x 64 tokens)."""
    import torch
    import torch.nn.functional as F

    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    q, k, v = (torch.randn(8, heads, ROWS // 8, head_dim, dtype=dtype, requires_grad=True)
               for _ in range(3))
    best = float("inf")
    for _ in range(repeats + 1):
        started = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def choose_compute_dtype(asked: str, device: str, config: Any, threads: int,
                         cache_dir: Path | None = None) -> DtypeChoice:
    """The compute dtype for a run.

    Args:
        asked: The recipe's ``compute_dtype``: ``auto``, ``float32`` or ``bfloat16``.
        device: ``cpu`` or ``cuda``.
        config: The base's HF config (its shapes are timed).
        threads: torch threads in use (part of the cache key).
        cache_dir: Where measurements are cached (default `default_cache_dir`; None: no cache).
    """
    if asked != "auto":
        return DtypeChoice(asked, "set by the recipe (compute_dtype)")
    if device == "cuda":
        return DtypeChoice("bfloat16", "CUDA: bfloat16, the QLoRA recipe's compute dtype")
    import torch

    shapes = model_shapes(config)
    cache = MeasurementCache(cache_dir, prefix="train-")
    key = cache.key(cpu_flags(), torch.__version__, threads, shapes, ROWS, "attention")
    cached = cache.read_as(key, DtypeChoice)
    if cached is not None:
        return cached
    fp32 = time_training_matmuls(shapes, torch.float32)
    bf16 = time_training_matmuls(shapes, torch.bfloat16)
    if fp32 >= bf16 * MIN_SPEEDUP:
        choice = DtypeChoice("bfloat16", f"measured: bf16 training matmuls {fp32 / bf16:.1f}x "
                             f"faster than fp32 on this CPU ({bf16:.1f} vs {fp32:.1f} ms)",
                             round(fp32, 2), round(bf16, 2))
        a32 = time_attention(config, torch.float32)
        a16 = time_attention(config, torch.bfloat16)
        choice.attention = "float32" if a32 < a16 else "bfloat16"
        choice.attention_float32_ms, choice.attention_bfloat16_ms = round(a32, 2), round(a16, 2)
    else:
        choice = DtypeChoice("float32", f"measured: bf16 training matmuls not faster than fp32 "
                             f"on this CPU ({bf16:.1f} vs {fp32:.1f} ms)",
                             round(fp32, 2), round(bf16, 2))
    cache.write(key, asdict(choice))  # a read-only cache only costs a re-measurement next run
    return choice


def default_cache_dir() -> Path:
    """``$LORADOCK_CACHE/dtype-choice`` or ``~/.cache/loradock/dtype-choice``."""
    return cache_root() / "dtype-choice"
