"""The 4-bit-code kernel (`serve.runtime.nf4_kernel`) against ``F.linear`` on the same values.

Weights are quantised and dequantised by bitsandbytes (what `hub.nf4` serves as ``nf4-dense``);
the kernel must reproduce ``F.linear`` on those dense values from their codes alone. The engine
serving an nf4-dense base through the kernel, greedy-exact against PEFT, is in
`tests/serve/test_engine_peft.py`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hub.machine import MeasurementCache
from serve.runtime import nf4_kernel
from serve.runtime.nf4_kernel import BLOCK, choose_rows, pack_nf4
from serve.runtime.weights import Projection

bnb = pytest.importorskip("bitsandbytes.functional")

# (out features, in features) as SmolLM2's fused projections have them, and an odd one.
SHAPES = [(960, 576), (576, 1536), (40, 128)]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _nf4_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.02
    quantised, state = bnb.quantize_4bit(weight, quant_type="nf4", blocksize=BLOCK,
                                         compress_statistics=True)
    return bnb.dequantize_4bit(quantised, state).reshape(n, k).contiguous()


def _packed(weight: torch.Tensor, dtype: torch.dtype):
    packed = pack_nf4(weight, dtype)
    if packed is None:
        pytest.skip("the native kernels are not available here (no C compiler)")
    return packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_kernel_matches_f_linear_on_the_dequantised_weight(n, k, dtype):
    """1 to 9 rows (several passes of up to 4), strided rows, with and without a bias."""
    weight = _nf4_weight(n, k)
    packed = _packed(weight, dtype)
    assert packed.nbytes < weight.numel(), "codes and scales: under a byte per weight"
    gen = torch.Generator().manual_seed(1)
    bias = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    for m in (1, 2, 3, 4, 5, 9):
        wide = torch.randn(m, k + 32, generator=gen).to(dtype)
        x = wide[:, 16:16 + k]  # rows of a wider tensor, as the runner's activations can be
        for b in (None, bias):
            expected = F.linear(x.float(), weight, None if b is None else b.float())
            got = packed(x, b)
            assert got.dtype == dtype and got.shape == (m, n)
            err = (got.float() - expected).abs().max() / expected.abs().max()
            assert err < TOLERANCE[dtype], (m, b is not None, float(err))


def test_weights_that_are_not_nf4_values_keep_the_dense_path():
    """A weight with any value off the 16-value grid has no codes; the dense path keeps it."""
    weight = _nf4_weight(64, 128)
    assert _packed(weight, torch.float32) is not None
    off_grid = weight.clone()
    off_grid[3, 5] += 1e-4
    assert pack_nf4(off_grid, torch.float32) is None
    assert pack_nf4(torch.randn(64, 128), torch.float32) is None
    assert pack_nf4(torch.randn(64, 100), torch.float32) is None, "k not a multiple of 64"


def test_projection_dispatches_by_rows_and_choose_rows_reports_its_timings():
    """Passes of up to ``small_rows`` rows take the kernel, longer ones the dense weight."""
    weight = _nf4_weight(256, 256)
    projection = Projection(weight, None)
    projection.small = _packed(weight, torch.float32)
    calls = []
    kernel = projection.small
    projection.small = lambda x, bias: calls.append(x.shape[0]) or kernel(x, bias)
    projection.small.k = kernel.k
    projection.small_rows = 2
    for m in (1, 2, 3, 8):
        x = torch.randn(m, 256)
        torch.testing.assert_close(projection(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert calls == [1, 2]
    projection.small = kernel
    rows, times = choose_rows([projection], torch.float32, repeats=1)
    assert 0 <= rows <= 4 and set(times) and all(d > 0 and k > 0 for d, k in times.values())


def test_the_row_choice_is_cached_per_model_and_a_forced_count_is_not_timed(monkeypatch,
                                                                           tmp_path):
    """A second start on the machine reads the timing; another model or dtype is timed anew."""
    calls = []

    def fake(projections, dtype, repeats=2):
        calls.append(dtype)
        return 3, {1: (20.0, 7.0), 2: (21.0, 8.0), 3: (22.0, 9.0), 4: (23.0, 24.0)}

    monkeypatch.setattr(nf4_kernel, "choose_rows", fake)
    cache = MeasurementCache(tmp_path)
    first = nf4_kernel.choose([], torch.bfloat16, -1, ["model", "nf4-dense"], cache)
    again = nf4_kernel.choose([], torch.bfloat16, -1, ["model", "nf4-dense"], cache)
    assert first[0] == again[0] == 3 and calls == [torch.bfloat16]
    assert "(cached)" in again[1] and "3: 22.0/9.0" in again[1] and "(cached)" not in first[1]
    nf4_kernel.choose([], torch.float32, -1, ["model", "nf4-dense"], cache)
    nf4_kernel.choose([], torch.bfloat16, -1, ["other", "nf4-dense"], cache)
    assert len(calls) == 3, "another dtype or model is timed again"
    assert nf4_kernel.choose([], torch.bfloat16, 2, ["model", "nf4-dense"], cache) == (
        2, "4-bit-code kernel up to 2 rows (asked for)")
    assert len(calls) == 3
