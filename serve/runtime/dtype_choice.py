"""Pick the CPU compute dtype by measurement: the faster of fp32 and bf16 that keeps the answers.

CPUs differ: on one machine of this project bf16 matmuls ran 7-10x slower than fp32 (AVX2, no
native bf16), on others 2.5-7x faster (AVX512-BF16, AMX). So nothing is assumed. At start:

1. **Speed**: the model's own projection shapes (q|k|v, o, gate|up, down, lm_head) are timed
   with ``F.linear`` at a decode batch of 16 rows, in fp32 and in bf16, a fraction of a second
   each.
2. **Agreement**: if bf16 is faster, the base runs a fixed probe set teacher-forced (a few
   sentences through the base's own tokenizer) in fp32 and in bf16 as the runner computes it
   (its leading logits recomputed in fp32, `serve.runtime.logits`); bf16 is chosen only when
   its top-1 token equals fp32's at ``>= MIN_AGREEMENT`` of the positions.

3. **Kernel**: in the chosen dtype, the same shapes are timed at 1 and 16 rows with ``F.linear``
   and with oneDNN on weights reordered once (`serve.runtime.weights.onednn_pack`; the same
   numbers in bf16, summation-order rounding in fp32); the reordered layout is used when it
   is ``>= MIN_KERNEL_SPEEDUP`` faster.
4. **LoRA kernel and dtype**: the LoRA path itself (`serve.runtime.lora.LoraStack`, one
   layer's four projections, rank 16) is timed for one adapter at 1 and 16 rows and for 16 rows
   over 8 adapters: torch's ops with the pool in the compute dtype and in fp32, and the native
   kernel (`serve.runtime.native`) in the compute dtype, whose deltas must also agree with
   torch's on the same inputs. The native kernel is used where it is ``>= MIN_KERNEL_SPEEDUP``
   faster than both torch variants (``lora_kernel=auto``). The fp32-pool timing is recorded;
   the engine follows it only with ``lora_dtype=auto`` (not its default: this one-layer timing
   and whole decode steps disagreed on an AVX512-BF16 machine, see
   `serve.engines.peft.PeftOptions`).
5. **Decode attention**: 16 rows over 128 cached positions of the model's head geometry, by
   torch's SDPA and by the native kernel (`serve.runtime.native.DecodeAttention`); native where
   it is ``>= MIN_KERNEL_SPEEDUP`` faster and agrees (``attention_kernel=auto``).

The result is logged and cached per (CPU flags, torch version, threads, base weights), so later
starts on the same machine skip the measurement. ``--base-dtype fp32|bf16`` forces a choice.

Where the job ends: this module returns a choice; loading weights in it is `serve.runtime.base`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub.machine import Geometry, MeasurementCache, cache_root, cpu_flags

if TYPE_CHECKING:
    import torch

log = logging.getLogger("loradock.serve")

MIN_AGREEMENT = 0.97
# bf16 must beat fp32 by this factor on the matmul timing to be considered at all.
MIN_SPEEDUP = 1.10
BATCH = 16
# The oneDNN layout must beat F.linear by this factor (summed over 1 and BATCH rows).
MIN_KERNEL_SPEEDUP = 1.05
CACHE_VERSION = 6
# The native LoRA kernel's deltas may differ from torch's by this much (of their largest).
NATIVE_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. Then it runs into the forest and hides.",
    "Extract the name and age: Ana is 30 years old and lives in Braga, Portugal.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.",
)


@dataclass
class DtypeChoice:
    """What was chosen and why (logged, shown in /health detail, cached)."""

    dtype: str  # "fp32" or "bf16"
    reason: str
    fp32_ms: float = 0.0
    bf16_ms: float = 0.0
    agreement: float | None = None
    kernel: str = "linear"  # "linear" (F.linear) or "onednn" (reordered weights)
    linear_ms: float = 0.0
    onednn_ms: float = 0.0
    lora: str = "compute"  # "compute" (the compute dtype) or "fp32"
    lora_compute_ms: float = 0.0
    lora_fp32_ms: float = 0.0
    lora_kernel: str = "torch"  # "torch" or "native" (serve.runtime.native)
    lora_native_ms: float = 0.0
    attention: str = "sdpa"  # "sdpa" or "native" (serve.runtime.native)
    attention_sdpa_ms: float = 0.0
    attention_native_ms: float = 0.0
    cached: bool = False


def time_matmuls(shapes: list[tuple[int, int]], dtype: torch.dtype, rows: int = BATCH,
                 repeats: int = 5, kernel: str = "linear") -> float:
    """Milliseconds of one pass over ``shapes`` (``[(out, in)]``), best of repeats.

    ``kernel``: ``linear`` (``F.linear``) or ``onednn`` (weights reordered first, not timed);
    ``inf`` when oneDNN is not available.
    """
    import torch

    from serve.runtime.weights import Projection

    projections = [Projection(torch.randn(o, i, dtype=dtype) * 0.02) for o, i in shapes]
    if kernel == "onednn" and not all(p.pack() for p in projections):
        return float("inf")
    inputs = [torch.randn(rows, i, dtype=dtype) for _, i in shapes]
    best = float("inf")
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for p, x in zip(projections, inputs, strict=True):
            p(x)
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def choose_kernel(shapes: list[tuple[int, int]], dtype: torch.dtype) -> tuple[str, float, float]:
    """``(kernel, linear_ms, onednn_ms)``: times summed over a 1-row and a BATCH-row pass."""
    linear = sum(time_matmuls(shapes, dtype, rows) for rows in (1, BATCH))
    onednn = sum(time_matmuls(shapes, dtype, rows, kernel="onednn") for rows in (1, BATCH))
    return ("onednn" if onednn * MIN_KERNEL_SPEEDUP <= linear else "linear"), linear, onednn


def probe_agreement(model: Any, tokenizer_path: Path) -> float:
    """Share of probe positions where bf16's top-1 token equals fp32's (teacher-forced).

    The bf16 side is computed as the runner serves it: every layer in bf16, then the lm_head in
    bf16 with its leading logits recomputed in fp32 (`serve.runtime.logits.refine_top`).
    """
    import copy

    import torch
    from transformers import AutoTokenizer

    from serve.runtime.logits import refine_top

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=False)
    vocab = int(model.config.vocab_size)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    sequences = [[i for i in tokenizer(text)["input_ids"] if i < vocab] for text in PROBE_TEXTS]
    low = copy.deepcopy(model).to(torch.bfloat16)
    same = total = 0
    with torch.inference_mode():
        for ids in sequences:
            batch = torch.tensor([ids])
            ref = model(input_ids=batch).logits[0].argmax(-1)
            hidden = low.model(input_ids=batch).last_hidden_state[0]
            weight = low.lm_head.weight
            got = refine_top(torch.nn.functional.linear(hidden, weight), hidden, weight)
            if softcap:
                got = torch.tanh(got / softcap) * softcap
            same += int((ref == got.argmax(-1)).sum())
            total += len(ids)
    del low
    return same / max(1, total)


def choose(model: Any, base_path: Path, weights_id: str, threads: int,
           cache_dir: Path | None) -> DtypeChoice:
    """Measure (or read from the cache) the compute dtype for ``model`` on this CPU.

    Args:
        model: The loaded fp32 model (its layers still present).
        base_path: The base folder (tokenizer for the probe).
        weights_id: What identifies the weights (path, sizes, format) for the cache key.
        threads: torch threads in use.
        cache_dir: Where choices are cached (None: no cache).
    """
    import torch

    cache = MeasurementCache(cache_dir)
    from serve.runtime import native

    key = cache.key(CACHE_VERSION, cpu_flags(), torch.__version__, threads, weights_id,
                    native.identity())
    cached = cache.read_as(key, DtypeChoice)
    if cached is not None:
        return cached
    shapes = model_shapes(model.config)
    fp32_ms = time_matmuls(shapes, torch.float32)
    bf16_ms = time_matmuls(shapes, torch.bfloat16)
    choice = DtypeChoice("fp32", "", fp32_ms, bf16_ms)
    if fp32_ms < bf16_ms * MIN_SPEEDUP:
        choice.reason = (f"bf16 matmuls are not faster here ({bf16_ms:.1f} ms vs fp32 "
                         f"{fp32_ms:.1f} ms)")
    else:
        choice.agreement = probe_agreement(model, base_path)
        if choice.agreement >= MIN_AGREEMENT:
            choice.dtype = "bf16"
            choice.reason = (f"bf16 matmuls {fp32_ms / bf16_ms:.1f}x faster and top-1 "
                             f"agreement {choice.agreement:.1%} >= {MIN_AGREEMENT:.0%}")
        else:
            choice.reason = (f"bf16 is {fp32_ms / bf16_ms:.1f}x faster but top-1 agreement "
                             f"{choice.agreement:.1%} < {MIN_AGREEMENT:.0%}")
    add_kernel(choice, model.config)
    if not cache.write(key, asdict(choice)):  # a read-only cache costs a re-measurement
        log.warning("could not cache the dtype choice in %s", cache_dir)
    return choice


def model_shapes(config: Any) -> list[tuple[int, int]]:
    """``[(out, in)]`` of four layers' fused projections and the lm_head: what is timed."""
    g = Geometry.of(config)
    return [(g.q + 2 * g.kv, g.hidden), (g.hidden, g.q), (2 * g.intermediate, g.hidden),
            (g.hidden, g.intermediate)] * 4 + [(g.vocab, g.hidden)]


def time_lora(config: Any, dtype: torch.dtype, compute: torch.dtype, repeats: int = 5,
              kernel: str = "torch") -> tuple[float, torch.Tensor]:
    """The LoRA path of one layer: one adapter at 1 and BATCH rows, BATCH rows mixed over 8.

    Returns:
        Milliseconds (best of ``repeats``, summed over the three cases), and the mixed case's
        deltas (fixed seeds, so two kernels can be compared). ``inf`` when ``kernel`` is
        ``native`` and the kernel is not available.
    """
    import torch

    from serve.runtime.lora import AdapterWeights, LoraStack

    g = Geometry.of(config)
    shapes = {"qkv": (g.hidden, [g.q, g.kv, g.kv]), "o": (g.q, [g.hidden]),
              "gate_up": (g.hidden, [g.intermediate] * 2), "down": (g.intermediate, [g.hidden])}
    rank, adapters = 16, 8
    stack = LoraStack(shapes, adapters, dtype=dtype, kernel=kernel)
    if stack.kernel != kernel:
        return float("inf"), torch.zeros(0)
    offsets = {name: [sum(sizes[:i]) for i in range(len(sizes))]
               for name, (_, sizes) in shapes.items()}
    gen = torch.Generator().manual_seed(0)
    slots = [stack.install(AdapterWeights(
        {(0, name): (torch.randn(len(sizes) * rank, in_f, generator=gen) * 0.01,
                     [torch.randn(rank, size, generator=gen) * 0.01 for size in sizes])
         for name, (in_f, sizes) in shapes.items()}, rank)) for _ in range(adapters)]
    cases = [[slots[0]], [slots[0]] * BATCH, [slots[i % adapters] for i in range(BATCH)]]
    total = 0.0
    for row_slots in cases:
        plan = stack.plan(row_slots)
        rows = len(row_slots)
        inputs = {name: torch.randn(rows, in_f, generator=gen).to(compute)
                  for name, (in_f, _) in shapes.items()}
        outs = {name: torch.zeros(rows, sum(sizes), dtype=compute) for name, (_, sizes) in
                shapes.items()}
        best = float("inf")
        for _ in range(repeats + 1):
            for out in outs.values():
                out.zero_()
            started = time.perf_counter()
            for name in shapes:
                stack.apply((0, name), inputs[name], outs[name], plan, offsets[name])
            best = min(best, time.perf_counter() - started)
        total += best
    return total * 1e3, torch.cat([out.float() for out in outs.values()], dim=1)


def time_attention(config: Any, dtype: torch.dtype, kernel: str, rows: int = BATCH,
                   length: int = 128, repeats: int = 5) -> tuple[float, torch.Tensor]:
    """One layer's decode attention over ``length`` cached positions: ms (best) and output.

    ``inf`` when ``kernel`` is ``native`` and the kernel is not available.
    """
    import torch
    import torch.nn.functional as F

    from serve.runtime.native import DecodeAttention

    g = Geometry.of(config)
    groups = g.heads // g.kv_heads
    gen = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(rows, g.kv_heads, 2 * length, g.head_dim, generator=gen)
                    .to(dtype)[:, :, :length] for _ in range(2))
    q = torch.randn(rows, g.heads * g.head_dim, generator=gen).to(dtype)
    hi = torch.arange(length - rows, length, dtype=torch.int32) + 1  # rows at their own length
    scale = g.head_dim ** -0.5
    if kernel == "native":
        attention = DecodeAttention.load(dtype)
        if attention is None:
            return float("inf"), torch.zeros(0)
        lo = torch.zeros_like(hi)
        out = torch.empty(rows, g.heads * g.head_dim, dtype=dtype)

        def run() -> torch.Tensor:
            attention(q, keys, values, lo, hi, scale, None, out)
            return out
    else:
        visible = torch.arange(length)[None, :] < hi[:, None]
        mask = torch.zeros(rows, 1, 1, length, dtype=dtype).masked_fill_(
            ~visible[:, None, None], float("-inf"))
        query = q.view(rows, g.kv_heads, groups, g.head_dim)

        def run() -> torch.Tensor:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                                  scale=scale).reshape(rows, -1)
    best = float("inf")
    for _ in range(repeats + 1):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best * 1e3, result.float()


def _agree(mine: torch.Tensor, reference: torch.Tensor, dtype_name: str) -> bool:
    """True when ``mine`` equals ``reference`` up to NATIVE_TOLERANCE of its largest value."""
    return mine.shape == reference.shape and bool(
        (mine - reference).abs().max() <= NATIVE_TOLERANCE[dtype_name]
        * reference.abs().max())


def add_kernel(choice: DtypeChoice, config: Any) -> DtypeChoice:
    """Measure the faster matmul kernel, LoRA kernel and LoRA dtype for ``choice`` (in place)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(choice.dtype, torch.float32)
    choice.kernel, choice.linear_ms, choice.onednn_ms = choose_kernel(model_shapes(config), dtype)
    choice.reason += (f"; {choice.kernel} kernel (F.linear {choice.linear_ms:.1f} ms, oneDNN "
                      f"reordered {choice.onednn_ms:.1f} ms, 1 + {BATCH} rows)")
    choice.lora_compute_ms, deltas = time_lora(config, dtype, dtype)
    torch_ms = choice.lora_compute_ms
    if dtype != torch.float32:
        choice.lora_fp32_ms = time_lora(config, torch.float32, dtype)[0]
        choice.lora = "fp32" if choice.lora_fp32_ms * MIN_KERNEL_SPEEDUP <= \
            choice.lora_compute_ms else "compute"
        torch_ms = min(torch_ms, choice.lora_fp32_ms)
    choice.lora_native_ms, native_deltas = time_lora(config, dtype, dtype, kernel="native")
    agrees = _agree(native_deltas, deltas, choice.dtype)
    if choice.lora_native_ms * MIN_KERNEL_SPEEDUP <= torch_ms and agrees:
        choice.lora_kernel, choice.lora = "native", "compute"
    native = ("not available" if choice.lora_native_ms == float("inf")
              else f"{choice.lora_native_ms:.2f} ms" + ("" if agrees else ", disagreed"))
    choice.reason += (f"; LoRA by {choice.lora_kernel} in {choice.lora} (torch "
                      f"{choice.lora_compute_ms:.2f} ms"
                      + (f", fp32 pools {choice.lora_fp32_ms:.2f} ms"
                         if dtype != torch.float32 else "")
                      + f", native {native} per layer)")
    choice.attention_sdpa_ms, reference = time_attention(config, dtype, "sdpa")
    choice.attention_native_ms, mine = time_attention(config, dtype, "native")
    agrees = _agree(mine, reference, choice.dtype)
    if choice.attention_native_ms * MIN_KERNEL_SPEEDUP <= choice.attention_sdpa_ms and agrees:
        choice.attention = "native"
    native = ("not available" if choice.attention_native_ms == float("inf")
              else f"{choice.attention_native_ms:.3f} ms" + ("" if agrees else ", disagreed"))
    choice.reason += (f"; decode attention by {choice.attention} (SDPA "
                      f"{choice.attention_sdpa_ms:.3f} ms, native {native}, {BATCH} rows)")
    return choice


def default_cache_dir() -> Path:
    """``$LORADOCK_CACHE/dtype-choice`` or ``~/.cache/loradock/dtype-choice``."""
    return cache_root() / "dtype-choice"
