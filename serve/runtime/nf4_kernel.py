"""Decode rows of an nf4-dense base read its 4-bit codes, not its dense weights.

A decode step with one to a few rows is bound by memory bandwidth: every weight is read once
for a handful of flops. On a 2-core AVX512-BF16 machine the bf16 projections of one SmolLM2
step took 24.8 ms at one row, about 11 GB/s, whatever kernel ran them. An ``nf4-dense`` base
(`hub.nf4`) holds only 16 distinct values per block of 64 weights, times the block's scale, so
those weights fit in 4-bit codes plus one fp32 scale per block: about a quarter of the bytes
of bf16 and an eighth of fp32. `native.c`'s ``nf4_linear`` decodes them in registers (one
table permute per 16 weights), over a few rows at once, on the engine's threads.

The numbers are the base's exact 4-bit values (code value times scale, in fp32) with fp32
accumulation, so they are at least as close to the fp32 model as the bf16 layers they stand in
for (those round each 4-bit value to bf16 too); the tests check them against ``F.linear`` on
the same values.

`pack_nf4` recovers the codes from a dense weight and returns None unless the weight is exactly
such values (any other base keeps its dense path). `choose_rows` times the kernel against the
dense projections at `ROW_COUNTS` rows and returns the most rows at which it is faster (0:
never), so a machine where it does not pay keeps what it had. It times every layer, as a
decode step reads them: one layer's weights stay in cache between repeats, which hides the
bytes the kernel saves. Measured with torch and oneDNN held to AVX2 and the x86-64-v3 build
(fp32 activations), one hot layer timed dense 0.27 ms against the kernel's 0.34 ms, and a pass
over all 30 layers at one row 28.4 ms dense against 13.2 ms from the codes (9.2 ms since the
AVX2 path decodes into 8-lane vectors). `choose` caches that result like the thread plan (per
CPU flags, torch, threads, kernels and model), so a restart on the same machine skips the
second or so it takes.

Where the job ends: packing, calling and timing the kernel; the projection that dispatches to
it by row count is `serve.runtime.weights.Projection`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from hub.machine import MeasurementCache, cpu_flags

if TYPE_CHECKING:
    import torch

    from serve.runtime.weights import Projection

log = logging.getLogger("loradock.serve")

BLOCK = 64  # bitsandbytes' 4-bit block size, which the kernel's layout assumes
# Row counts timed at start, in order. The kernel decodes up to 4 rows per pass over the codes
# (`native.c`'s NF4_MAXM) and more as several passes; on AMX bf16 it stopped paying at 4 rows,
# with torch and oneDNN held to AVX2 (fp32, all layers) it still won at 16: 45.6 against
# 50.2 ms dense, and lost at 32 (81.0 against 58.3 ms).
ROW_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
MAX_ROWS = ROW_COUNTS[-1]
MIN_SPEEDUP = 1.05  # the kernel must beat the dense path by this much at a row count
CACHE_VERSION = 2


def nf4_table() -> torch.Tensor | None:
    """The 16 NF4 values of bitsandbytes (ascending, fp32), or None without it."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    return bnbf.get_4bit_type("nf4", device="cpu").float().contiguous()


class Nf4Linear:
    """One projection's weight ``[n, k]`` as 4-bit codes and block scales (`native.c` layout).

    Attributes:
        codes: ``uint8 [n, k / 2]``: block ``b`` of row ``j`` is 32 bytes, byte ``t`` holding
            element ``64 b + t`` (low nibble) and ``64 b + 32 + t`` (high nibble).
        scales: ``float32 [n, k / 64]``: each block's absolute maximum.
        table: The 16 values a code stands for.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor,
                 fn) -> None:
        self.codes, self.scales, self.table, self.fn = codes, scales, table, fn
        self.n = int(codes.shape[0])
        self.k = int(codes.shape[1]) * 2

    @property
    def nbytes(self) -> int:
        """Bytes held (codes, scales)."""
        return self.codes.numel() + self.scales.numel() * 4

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, W, bias)`` for ``x`` ``[m, k]`` (rows may be strided) in W's values."""
        import torch

        if x.stride(-1) != 1:
            x = x.contiguous()
        m = x.shape[0]
        out = torch.empty(m, self.n, dtype=x.dtype)
        rc = self.fn(m, self.k, self.n, x.data_ptr(), x.stride(0), self.codes.data_ptr(),
                     self.scales.data_ptr(), self.table.data_ptr(),
                     None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0),
                     torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"nf4_linear failed ({rc}) for a [{self.n}, {self.k}] weight")
        return out


def pack_nf4(weight: torch.Tensor, dtype: torch.dtype) -> Nf4Linear | None:
    """``weight`` (fp32 ``[n, k]``) as codes, if it is exactly NF4 values; else None.

    Also None where the kernels or bitsandbytes are not available, for a compute dtype the
    kernel has no variant of, or when ``k`` is not a multiple of the block size.
    """
    import torch

    from serve.runtime.native import nf4_linear

    fn = nf4_linear(dtype)
    table = nf4_table()
    if (fn is None or table is None or weight.dtype != torch.float32 or weight.dim() != 2
            or weight.shape[1] % BLOCK):
        return None
    n, k = weight.shape
    blocks = weight.reshape(n, k // BLOCK, BLOCK)
    scales = blocks.abs().amax(-1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.bucketize(blocks / safe.unsqueeze(-1), (table[1:] + table[:-1]) / 2)
    if not torch.equal(table[codes] * scales.unsqueeze(-1), blocks):
        return None  # not 4-bit values (or not NF4's): the dense path keeps it
    codes = codes.to(torch.uint8)
    packed = (codes[..., :BLOCK // 2] | (codes[..., BLOCK // 2:] << 4)).reshape(n, k // 2)
    return Nf4Linear(packed.contiguous(), scales.contiguous(), table, fn)


def _best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats + 1):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def choose_rows(projections: list[Projection], dtype: torch.dtype, repeats: int = 2,
                ) -> tuple[int, dict[int, tuple[float, float]]]:
    """The most rows (of `ROW_COUNTS`) at which the kernel beats the dense projections.

    Small passes may later run on one thread or on all (`serve.runtime.threads_choice` decides
    that after this, with the kernel in place), so a row count counts only where the kernel is
    faster on both.

    Args:
        projections: Every layer's projections, each with ``small`` set (`pack_nf4`).
        dtype: The compute dtype of the activations.
        repeats: Timed passes per row count (best taken).

    Returns:
        ``(rows, {rows: (dense_ms, kernel_ms)})`` with the times on all threads; rows is 0 when
        it is not faster at one row. A row count counts only if every smaller one timed did
        (the counts between two that did are taken too).
    """
    import torch

    threads = torch.get_num_threads()
    times: dict[int, tuple[float, float]] = {}
    chosen = 0
    try:
        with torch.inference_mode():
            for m in ROW_COUNTS:
                inputs = [torch.randn(m, p.small.k, dtype=dtype) for p in projections]

                def dense(inputs=inputs):
                    for p, x in zip(projections, inputs, strict=True):
                        p.dense(x)

                def kernel(inputs=inputs):
                    for p, x in zip(projections, inputs, strict=True):
                        p.small(x, p.bias)

                faster = True
                for count in sorted({1, threads}, reverse=True):
                    torch.set_num_threads(count)
                    pair = (_best_ms(dense, repeats), _best_ms(kernel, repeats))
                    times.setdefault(m, pair)
                    faster = faster and pair[1] * MIN_SPEEDUP <= pair[0]
                if not faster:
                    break
                chosen = m
    finally:
        torch.set_num_threads(threads)
    return chosen, times


@dataclass
class RowChoice:
    """A timed row choice as cached (`choose`).

    Attributes:
        rows: The most rows passes run by the kernel (0: never).
        times: ``{rows: [dense ms, kernel ms]}`` as `choose_rows` timed them.
    """

    rows: int
    times: dict[str, list[float]]
    cached: bool = False


def choose(projections: list[Projection], dtype: torch.dtype, forced: int, model_id: Any,
           cache: MeasurementCache) -> tuple[int, str]:
    """The rows up to which ``projections`` use the kernel: forced, cached or timed now.

    Args:
        projections: Every layer's projections, each with ``small`` set (`pack_nf4`).
        dtype: The compute dtype of the activations.
        forced: That many rows, or -1: `choose_rows` (its result cached under ``model_id``).
        model_id: What identifies the weights and the dense path (JSON-serialisable).
        cache: Where results are cached.

    Returns:
        ``(rows, reason)``: the reason names the timings, logged and shown in ``/health``.
    """
    import torch

    from serve.runtime.native import identity

    if forced >= 0:
        return forced, f"4-bit-code kernel up to {forced} rows (asked for)"
    key = cache.key(CACHE_VERSION, cpu_flags(), torch.__version__, torch.get_num_threads(),
                    str(dtype), identity(), model_id)
    choice = cache.read_as(key, RowChoice)
    if choice is None:
        rows, times = choose_rows(projections, dtype)
        choice = RowChoice(rows, {str(m): list(pair) for m, pair in times.items()})
        if not cache.write(key, asdict(choice)):
            log.warning("could not cache the 4-bit-code kernel's row choice")
    shown = ", ".join(f"{m}: {d:.1f}/{k:.1f}" for m, (d, k) in choice.times.items())
    return choice.rows, (f"4-bit-code kernel up to {choice.rows} rows (every layer, "
                         f"dense/kernel ms by rows: {shown}){' (cached)' if choice.cached else ''}")
