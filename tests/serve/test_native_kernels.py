"""The native decode-attention and RMSNorm kernels against torch (table-driven, no model).

The LoRA kernel is checked in `tests/serve/test_lora_batched.py` (and here on every portable
build this CPU runs); both kernels serve every family token-exact in
`tests/serve/test_families.py`.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from serve.runtime import native
from serve.runtime.native import DecodeAttention, RmsNorm, Rope, SiluMul
from tests.serve.test_lora_batched import WIDE_ROWS, check_wide_native

# (label, rows, kv_heads, groups, head_dim, cached length, window, softcap)
CASES = [
    ("one row, multi-head", 1, 4, 1, 64, 9, None, None),
    ("grouped-query, rows at different lengths", 6, 2, 3, 32, 40, None, None),
    ("sliding window", 5, 2, 2, 16, 50, 7, None),
    ("soft-capped scores (Gemma 2)", 4, 1, 4, 64, 20, None, 5.0),
    ("head dim not a multiple of 16", 3, 2, 2, 24, 12, None, None),
    ("long context: scores on the heap", 3, 2, 4, 32, 1100, None, None),
]


def _reference(q, keys, values, lo, hi, scale, softcap, groups):
    n, kv_heads, length, d = keys.shape
    query = q.float().view(n, kv_heads, groups, d)
    scores = torch.matmul(query, keys.float().transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    j = torch.arange(length)
    visible = (j[None] >= lo[:, None].long()) & (j[None] < hi[:, None].long())
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    return torch.matmul(torch.softmax(scores, -1), values.float()).reshape(n, -1)


def _check_decode_attention(label, n, kv_heads, groups, d, length, window, cap, dtype):
    """One `CASES` row through the loaded kernel, against `_reference`."""
    attention = DecodeAttention.load(dtype)
    gen = torch.Generator().manual_seed(0)
    # A cache with room to spare, as the engine's (positions past `length` hold garbage).
    k_cache, v_cache = (torch.randn(n, kv_heads, length + 8, d, generator=gen).to(dtype)
                        for _ in range(2))
    keys, values = k_cache[:, :, :length], v_cache[:, :, :length]
    pos = torch.randint(0, length, (n,), generator=gen)
    pos[0] = length - 1
    hi = (pos + 1).to(torch.int32)
    lo = (pos - window + 1).clamp(min=0).to(torch.int32) if window else torch.zeros_like(hi)
    # Queries as the runner has them: rows of a wider q|k tensor.
    qk = torch.randn(n, (kv_heads * groups + kv_heads) * d, generator=gen).to(dtype)
    q = qk[:, :kv_heads * groups * d]
    scale = d ** -0.5
    want = _reference(q, keys, values, lo, hi, scale, cap, groups)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):  # one thread, and (query, kv head) items split over two
            torch.set_num_threads(count)
            out = torch.full((n, kv_heads * groups * d), float("nan"), dtype=dtype)
            attention(q, keys, values, lo, hi, scale, cap, out)
            torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol,
                                       msg=f"{label}, {count} threads")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("label", "n", "kv_heads", "groups", "d", "length", "window", "cap"),
                         CASES, ids=[c[0] for c in CASES])
def test_decode_attention_matches_reference(label, n, kv_heads, groups, d, length, window, cap,
                                            dtype):
    if native.library() is None:
        pytest.skip("no C compiler here: the native kernels cannot be built")
    _check_decode_attention(label, n, kv_heads, groups, d, length, window, cap, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "hidden", "residual"), [
    (1, 576, False), (7, 576, True), (5, 24, True), (9, 40, False)],
    ids=["one row", "rows over threads, with residual", "tail lanes, with residual",
         "tail lanes"])
def test_rms_norm_matches_torch(rows, hidden, residual, dtype):
    if native.library() is None:
        pytest.skip("no C compiler here: the native kernels cannot be built")
    norm = RmsNorm.load(dtype)
    gen = torch.Generator().manual_seed(3)
    wide = (torch.randn(rows, hidden + 8, generator=gen) * 3).to(dtype)
    x = wide[:, :hidden]  # strided rows, as a view of a wider tensor
    res = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype) if residual else None
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    want_x = x.clone()
    if res is not None:
        want_x.add_(res)  # torch's in-place add: the residual the next layer reads
    want = F.rms_norm(want_x.float(), (hidden,), weight.float(), 1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = norm(x, weight, 1e-5, res)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(x, want_x)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: rounded once, from fp32
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inter"), [(1, 64), (9, 40)], ids=["one row", "tail lanes"])
def test_silu_mul_matches_torch(rows, inter, dtype):
    if native.library() is None:
        pytest.skip("no C compiler here: the native kernels cannot be built")
    gen = torch.Generator().manual_seed(4)
    wide = (torch.randn(rows, 2 * inter + 8, generator=gen) * 4).to(dtype)
    gate_up = wide[:, :2 * inter]  # strided rows
    want = F.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()
    got = SiluMul.load(dtype)(gate_up)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "heads", "d"), [(1, 3, 64), (7, 5, 24)],
                         ids=["one token", "tail lanes, tokens over threads"])
def test_rope_matches_the_pair_adjacent_formula(tokens, heads, d, dtype):
    if native.library() is None:
        pytest.skip("no C compiler here: the native kernels cannot be built")
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(tokens, heads * d + 16, generator=gen).to(dtype)
    x = wide[:, :heads * d].view(tokens, heads, d)  # q|k as a view of a wider qkv row
    cos, sin = (torch.randn(32, d, generator=gen).to(dtype) for _ in range(2))
    positions = torch.randint(0, 32, (tokens,), generator=gen)
    rest = wide[:, heads * d:].clone()
    xf = x.float()
    swapped = xf.reshape(tokens, heads, d // 2, 2).flip(-1).view(tokens, heads, d)
    want = xf * cos.float()[positions][:, None] + swapped * sin.float()[positions][:, None]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Rope.load(dtype)(x, positions, cos, sin)
    finally:
        torch.set_num_threads(threads)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(x.float(), want, rtol=tol, atol=tol)
    assert torch.equal(wide[:, heads * d:], rest)  # the rest of the row (v) is untouched


def test_sdpa_agrees_with_the_reference_used_above():
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 2, 10, 16, generator=gen), torch.randn(2, 2, 10, 16,
                                                                          generator=gen)
    q = torch.randn(2, 2 * 2 * 16, generator=gen)
    hi = torch.tensor([10, 6], dtype=torch.int32)
    mask = torch.arange(10)[None] < hi[:, None]
    got = F.scaled_dot_product_attention(q.view(2, 2, 2, 16), keys, values,
                                         attn_mask=mask[:, None, None]).reshape(2, -1)
    want = _reference(q, keys, values, torch.zeros_like(hi), hi, 16 ** -0.5, None, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_failing_compiler_leaves_torch_paths(tmp_path, monkeypatch, caplog):
    from serve.runtime.lora import LoraStack

    monkeypatch.setenv("CC", "false")  # exits 1, as a broken toolchain would
    monkeypatch.delenv("LORADOCK_NATIVE_PREBUILT", raising=False)
    with caplog.at_level("WARNING", logger="loradock.serve"):
        assert native.build(tmp_path) is None
    assert "native kernels off" in caplog.text
    assert not list(tmp_path.iterdir())  # no half-written library left behind
    monkeypatch.setattr(native, "library", lambda: None)
    stack = LoraStack({"o": (8, [8])}, 1, dtype=torch.float32, kernel="native")
    assert stack.kernel == "torch"
    assert DecodeAttention.load("float32") is None
    assert RmsNorm.load("bfloat16") is None


def test_the_build_is_keyed_by_source_and_reused(tmp_path):
    if native.compiler() is None:
        pytest.skip("no C compiler here")
    first = native.build(tmp_path)
    assert first is not None and native.identity() in first.name
    mtime = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == mtime


@pytest.fixture
def fresh_library(monkeypatch):
    """Fresh `library`/`identity` caches (cleared again after, for the next test's env)."""
    monkeypatch.delenv("LORADOCK_NATIVE", raising=False)
    native.library.cache_clear()
    native.identity.cache_clear()
    yield monkeypatch
    native.library.cache_clear()
    native.identity.cache_clear()


def _best_level() -> str | None:
    """The highest portable level this CPU runs, by the x86-64 psABI levels' flag lists."""
    have = set(native.cpu_flags().split())
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "abm", "xsave", "popcnt",
          "pni", "ssse3", "sse4_1", "sse4_2", "cx16", "lahf_lm"}
    v4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    machine = platform.machine()
    if machine in ("aarch64", "arm64"):
        return "armv8-a"
    if machine in ("x86_64", "AMD64") and v3 <= have:
        return "x86-64-v4" if v4 <= have else "x86-64-v3"
    return None


def test_prebuilt_kernels_load_without_a_compiler_and_agree_with_torch(tmp_path,
                                                                       fresh_library):
    if native.compiler() is None or _best_level() is None:
        pytest.skip("no C compiler here, or no portable level for this CPU")
    written = native.prebuild(tmp_path / "prebuilt")
    assert [p.name for p in written] == [p.file for p in native.PORTABLE[native._arch()]]
    fresh_library.setenv("CC", "false")  # exits 1, as a broken toolchain would
    fresh_library.setenv("LORADOCK_NATIVE_PREBUILT", str(tmp_path / "prebuilt"))
    fresh_library.setenv("LORADOCK_CACHE", str(tmp_path / "cache"))
    lib = native.library()
    assert lib is not None
    assert Path(lib._name).name == f"loradock-native-{_best_level()}.so"
    # The identity names the prebuilt file (its bytes), not a local build.
    digest = hashlib.sha256(b"\0".join([Path(lib._name).read_bytes(),
                                        native.cpu_flags().encode(),
                                        platform.machine().encode()])).hexdigest()[:20]
    assert native.identity() == digest
    for case in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            _check_decode_attention(*case, dtype)
    assert not list((tmp_path / "cache").rglob("*.so"))  # the failed build left nothing


def test_every_portable_build_this_cpu_runs_agrees_with_torch(tmp_path, fresh_library):
    """Each level's own code paths: nf4 codes, decode attention and the LoRA kernel.

    AVX2 has no 16-entry permute (two 8-entry ones there) and its LoRA and attention kernels
    work in 8-lane vectors; an AVX-512 machine runs the x86-64-v3 build too, so both are
    checked on it.
    """
    bnb = pytest.importorskip("bitsandbytes.functional")
    from serve.runtime.nf4_kernel import BLOCK, pack_nf4

    if native.compiler() is None or _best_level() is None:
        pytest.skip("no C compiler here, or no portable level for this CPU")
    have = set(native.cpu_flags().split())
    written = native.prebuild(tmp_path / "prebuilt")
    fresh_library.setenv("CC", "false")
    fresh_library.setenv("LORADOCK_CACHE", str(tmp_path / "cache"))
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(96, 256, generator=gen) * 0.02
    quantised, state = bnb.quantize_4bit(raw, quant_type="nf4", blocksize=BLOCK)
    weight = bnb.dequantize_4bit(quantised, state).reshape(96, 256).contiguous()
    ran = []
    for level, path in zip(native.PORTABLE[native._arch()], written, strict=True):
        if not level.needs <= have:
            continue
        alone = tmp_path / level.level
        alone.mkdir()
        (alone / path.name).write_bytes(path.read_bytes())
        fresh_library.setenv("LORADOCK_NATIVE_PREBUILT", str(alone))
        native.library.cache_clear()
        native.identity.cache_clear()
        assert Path(native.library()._name).parent == alone
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            packed = pack_nf4(weight, dtype)
            for m in (1, 3, 6):
                x = torch.randn(m, 256, generator=gen).to(dtype)
                expected = F.linear(x.float(), weight)
                err = (packed(x).float() - expected).abs().max() / expected.abs().max()
                assert err < tolerance, (level.level, dtype, m, float(err))
            for case in CASES:
                _check_decode_attention(*case, dtype)
            for row_adapters in WIDE_ROWS:
                check_wide_native(dtype, 1e-5 if dtype == torch.float32 else 2e-2,
                                  row_adapters)
        ran.append(level.level)
    assert ran


def test_an_empty_prebuilt_folder_without_a_compiler_gives_none(tmp_path, fresh_library,
                                                                caplog):
    fresh_library.setenv("CC", "false")
    fresh_library.setenv("LORADOCK_NATIVE_PREBUILT", str(tmp_path))
    fresh_library.setenv("LORADOCK_CACHE", str(tmp_path / "cache"))
    with caplog.at_level("INFO", logger="loradock.serve"):
        assert native.library() is None
        assert native.identity() == ""
    assert "native kernels off" in caplog.text
    assert DecodeAttention.load("float32") is None and native.sgmv("float32") is None


@pytest.mark.parametrize(("name", "silu"), [("silu", True), ("swish", True),
                                            ("gelu_pytorch_tanh", False), ("gelu", False)])
def test_the_silu_kernel_is_chosen_by_what_the_activation_computes(name, silu):
    from transformers.activations import ACT2FN

    from serve.runtime.runner import computes_silu

    assert computes_silu(ACT2FN[name]) is silu
