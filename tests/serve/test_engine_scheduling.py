"""The peft engine under load: prefill mixed with decode, fair adapter slots, KV memory, faults.

In-process on the real SmolLM2 with real PEFT adapters (fp32 compute, so outputs can be compared
exactly); the compute-dtype choice itself is tested at the end.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from hub.errors import EngineUnavailable
from tests.serve.test_engine_peft import collect, request, run, start_engine


def test_decode_rows_keep_flowing_while_a_long_prompt_prefills(base_info, prompts):
    engine = start_engine(base_info, max_running=4, options={"prefill_chunk": 32})
    try:
        async def go():
            running = engine.generate(request(prompts[0], max_tokens=60, stop_token_ids=[]))
            await running.__anext__()  # A is decoding
            long_prompt = (prompts[1] * 20)[:480]  # 15 chunks of 32 tokens
            during, started = 0, asyncio.Event()
            first_of_long: list[float] = []

            async def long_request():
                stream = engine.generate(request(long_prompt, max_tokens=2, stop_token_ids=[]))
                started.set()
                async for _ in stream:
                    first_of_long.append(time.monotonic())

            task = asyncio.create_task(long_request())
            await started.wait()
            async for _ in running:
                if not first_of_long:
                    during += 1
            await task
            return during

        during = run(go())
        # One decode row per pass while the 15 prompt chunks are prefilled in the same passes.
        assert during >= 10, f"only {during} tokens of the running stream during the prefill"
    finally:
        run(engine.shutdown(drain_timeout_s=5))


def test_a_cold_adapter_is_not_starved_by_traffic_to_a_resident_one(base_info, prompts, store,
                                                                     adapter_factory):
    hot = store.register(adapter_factory(seed=11, r=8), "hot")
    cold = store.register(adapter_factory(seed=12, r=8), "cold")
    engine = start_engine(base_info, max_adapters=1, max_running=8)
    try:
        async def go():
            done = asyncio.Event()
            hot_finished = 0

            async def hot_client():
                nonlocal hot_finished
                while not done.is_set():  # always a request in flight for "hot"
                    await collect(engine, request(prompts[0], hot, max_tokens=8,
                                                  stop_token_ids=[]))
                    hot_finished += 1

            clients = [asyncio.create_task(hot_client()) for _ in range(3)]
            await asyncio.sleep(1.0)  # "hot" is resident and pinned
            started = time.monotonic()
            tokens, _ = await asyncio.wait_for(
                collect(engine, request(prompts[1], cold, max_tokens=4, stop_token_ids=[])), 60)
            waited = time.monotonic() - started
            still_busy = not all(c.done() for c in clients)
            done.set()
            await asyncio.gather(*clients)
            return tokens, waited, still_busy, hot_finished

        tokens, waited, still_busy, hot_finished = run(go())
        assert len(tokens) == 4
        assert still_busy and hot_finished > 0, "the hot traffic must keep going meanwhile"
        assert waited < 30, f"the cold adapter waited {waited:.1f} s"
    finally:
        run(engine.shutdown(drain_timeout_s=5))


def test_adapters_under_steady_traffic_take_turns_in_one_slot(base_info, prompts, store,
                                                              adapter_factory):
    """One slot, two adapters each always wanted: A is drained for B, then B for A again.

    A drained adapter that has given its slot up no longer blocks the next drain (it used to
    stay marked, so A waited for as long as B's traffic lasted).
    """
    a, b = (store.register(adapter_factory(seed=40 + i, r=8), f"turns-{n}")
            for i, n in enumerate("ab"))
    engine = start_engine(base_info, max_adapters=1, max_running=8)
    try:
        done = {"a": 0, "b": 0}

        async def busy(name, record, stop: asyncio.Event) -> None:
            while not stop.is_set():  # always a request in flight for this adapter
                await collect(engine, request(prompts[0], record, max_tokens=8,
                                              stop_token_ids=[]))
                done[name] += 1

        async def until(predicate, limit: float) -> float:
            started = time.monotonic()
            while not predicate() and time.monotonic() - started < limit:
                await asyncio.sleep(0.05)
            return time.monotonic() - started

        async def go():
            stop = asyncio.Event()
            clients = [asyncio.create_task(busy("a", a, stop)) for _ in range(3)]
            await until(lambda: done["a"] > 0, 60)
            clients += [asyncio.create_task(busy("b", b, stop)) for _ in range(3)]
            waited_b = await until(lambda: done["b"] > 0, 30)
            a_then = done["a"]
            waited_a = await until(lambda: done["a"] > a_then, 30)
            stop.set()
            await asyncio.gather(*clients)
            return waited_b, waited_a

        waited_b, waited_a = run(go())
        assert waited_b < 30, f"B waited {waited_b:.1f} s for its first turn"
        assert waited_a < 30, f"A waited {waited_a:.1f} s for its turn back"
    finally:
        run(engine.shutdown(drain_timeout_s=5))


def test_kv_memory_shrinks_back_after_a_long_request(base_info, prompts):
    engine = start_engine(base_info, max_running=2, options={"kv_initial_len": 64})
    try:
        cache = engine._runner.cache
        assert cache.capacity == 64
        long_prompt = (prompts[0] * 20)[:400]
        run(collect(engine, request(long_prompt, max_tokens=2, stop_token_ids=[])))
        run(collect(engine, request(prompts[1], max_tokens=2, stop_token_ids=[])))
        deadline = time.monotonic() + 10  # the worker shrinks at the end of its next step
        while cache.capacity != 64 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cache.peak >= 512 and cache.capacity == 64
    finally:
        run(engine.shutdown(drain_timeout_s=5))


def test_a_failing_pass_fails_only_the_requests_it_concerns(base_info, prompts):
    engine = start_engine(base_info, max_running=4)
    alone = run(collect(engine, request(prompts[0], max_tokens=12)))[0]
    runner = engine._runner
    forward = runner.forward
    poison = list(prompts[1])

    def failing(decode, chunks):  # a pass that prefills the poisoned prompt('s uncached rest)
        if any(list(tokens) == poison[start:] for _, tokens, start, _ in chunks):
            raise RuntimeError("injected fault")
        return forward(decode, chunks)

    runner.forward = failing
    try:
        async def go():
            good = asyncio.create_task(collect(engine, request(prompts[0], max_tokens=12)))
            await asyncio.sleep(0.3)
            with pytest.raises(EngineUnavailable):
                await collect(engine, request(prompts[1], max_tokens=12))
            return (await good)[0]

        assert run(go()) == alone
        assert engine.health().status == "ok"
    finally:
        runner.forward = forward
        run(engine.shutdown(drain_timeout_s=5))


# -- the compute dtype ---------------------------------------------------------------------


def test_compute_dtype_is_measured_then_cached(base_model, base_info, tmp_path):
    from pathlib import Path

    from serve.runtime import dtype_choice

    first = dtype_choice.choose(base_model, Path(base_info.path), "smollm2-test", 2, tmp_path)
    assert first.dtype in ("fp32", "bf16") and first.fp32_ms > 0 and first.bf16_ms > 0
    assert first.reason and not first.cached
    if first.dtype == "bf16":
        assert first.agreement >= dtype_choice.MIN_AGREEMENT
    again = dtype_choice.choose(base_model, Path(base_info.path), "smollm2-test", 2, tmp_path)
    assert again.cached and again.dtype == first.dtype


# (fp32 ms, bf16 ms, top-1 agreement, expected): the AVX2 machine (bf16 7x slower), an
# AVX512-BF16 machine, and a model whose answers bf16 changes too often.
DTYPE_CASES = [
    ("bf16 emulated, 7x slower", 10.0, 70.0, None, "fp32"),
    ("bf16 barely faster", 10.0, 9.5, None, "fp32"),
    ("bf16 2.5x faster, answers kept", 10.0, 4.0, 0.99, "bf16"),
    ("bf16 2.5x faster, answers changed", 10.0, 4.0, 0.90, "fp32"),
]


@pytest.mark.parametrize(("label", "fp32_ms", "bf16_ms", "agreement", "expected"), DTYPE_CASES,
                         ids=[c[0] for c in DTYPE_CASES])
def test_dtype_rule(label, fp32_ms, bf16_ms, agreement, expected, monkeypatch, tmp_path,
                    base_model, base_info):
    from pathlib import Path

    import torch

    from serve.runtime import dtype_choice

    timings = {torch.float32: fp32_ms, torch.bfloat16: bf16_ms}
    monkeypatch.setattr(dtype_choice, "time_matmuls",
                        lambda shapes, dtype, *args, **kwargs: timings[dtype])

    def probe(model, path):
        assert agreement is not None, "the probe must not run when bf16 is not faster"
        return agreement

    monkeypatch.setattr(dtype_choice, "probe_agreement", probe)
    choice = dtype_choice.choose(base_model, Path(base_info.path), label, 2, tmp_path)
    assert choice.dtype == expected, choice.reason


# (F.linear ms, oneDNN ms, expected kernel): oneDNN's reordered weights only where measured faster.
KERNEL_CASES = [("onednn 1.6x faster", 16.0, 10.0, "onednn"),
                ("onednn equal", 10.0, 10.0, "linear"),
                ("onednn missing", 10.0, float("inf"), "linear")]


@pytest.mark.parametrize(("label", "linear_ms", "onednn_ms", "expected"), KERNEL_CASES,
                         ids=[c[0] for c in KERNEL_CASES])
def test_kernel_rule(label, linear_ms, onednn_ms, expected, monkeypatch):
    from serve.runtime import dtype_choice

    monkeypatch.setattr(dtype_choice, "time_matmuls", lambda shapes, dtype, rows, kernel="linear":
                        linear_ms if kernel == "linear" else onednn_ms)
    kernel, _, _ = dtype_choice.choose_kernel([(8, 8)], None)
    assert kernel == expected


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_onednn_projection_matches_f_linear(dtype_name):
    import torch
    import torch.nn.functional as F

    from serve.runtime.weights import Projection

    dtype = getattr(torch, dtype_name)
    weight, bias = torch.randn(96, 64, dtype=dtype), torch.randn(96, dtype=dtype)
    x = torch.randn(5, 64, dtype=dtype)
    projection = Projection(weight.clone(), bias)
    if not projection.pack():
        pytest.skip("this torch build has no oneDNN")
    assert projection.weight is None  # the reordered copy is the only one held
    got, want = projection(x), F.linear(x, weight, bias)
    if dtype == torch.bfloat16:  # both oneDNN: the same numbers
        assert torch.equal(got, want)
    else:  # oneDNN vs MKL: the summation order differs by rounding only
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
