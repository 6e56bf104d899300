"""The peft engine in-process on the real SmolLM2 and real PEFT adapters.

Greedy outputs are checked token for token against PEFT itself (transformers fp32 model +
``PeftModel.from_pretrained`` + ``generate(do_sample=False)``), alone and mixed in one batch.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from hub.errors import Conflict, EngineUnavailable, InvalidInput, Overloaded, Unsupported
from serve.engine import (
    Engine,
    EngineConfig,
    GenerationRequest,
    SamplingParams,
    adapter_key,
    create_engine,
)
from serve.runtime import native

MAX_TOKENS = 16
_ids = itertools.count()

# Adapters: distinct seeds, ranks and targets (and PEFT's scaling variants) so that padding,
# per-module targeting, rsLoRA and alpha/rank patterns are all exercised against PEFT.
ADAPTERS = {
    "wide": dict(seed=1, r=16, targets="all-linear", use_rslora=True, scale=0.1),
    "qv": dict(seed=2, r=8, targets=("q_proj", "v_proj"), scale=0.2,
               rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 32}),
    "mlp": dict(seed=3, r=4, targets=("gate_proj", "down_proj"), scale=0.3),
    "attn": dict(seed=4, r=32, alpha=32, targets=("k_proj", "o_proj"), scale=0.1),
}


def run(coro):
    return asyncio.run(coro)


def start_engine(base_info, **kwargs):
    config = EngineConfig(base=base_info, base_dtype="fp32", max_model_len=512, **kwargs)
    engine = create_engine("peft", config)
    run(engine.start())
    return engine


def request(prompt, record=None, max_tokens=MAX_TOKENS, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("stop_token_ids", [2])
    return GenerationRequest(f"req-{next(_ids)}", list(prompt), record,
                             SamplingParams(max_tokens=max_tokens, **params))


async def collect(engine, req):
    chunks = [chunk async for chunk in engine.generate(req)]
    return [t for c in chunks for t in c.token_ids], chunks


def peft_reference(base_model, prompt, adapter_path=None, max_tokens=MAX_TOKENS):
    import torch
    from peft import PeftModel

    model = base_model if adapter_path is None else PeftModel.from_pretrained(base_model,
                                                                              adapter_path)
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                 dtype=torch.long), max_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=2, pad_token_id=2)
    finally:
        if adapter_path is not None:
            model.unload()
    tokens = out[0, len(prompt):].tolist()
    return tokens[:tokens.index(2)] if 2 in tokens else tokens


@pytest.fixture(scope="module")
def engine(base_info):
    # prefill_chunk=16 makes the ~30-token prompts prefill in two chunks (the chunked path,
    # mixed with running decode rows in the same pass).
    engine = start_engine(base_info, max_adapters=4, options={"prefill_chunk": 16})
    assert isinstance(engine, Engine)
    yield engine
    run(engine.shutdown(drain_timeout_s=5))


def test_greedy_matches_peft_for_base_and_two_adapters(engine, store, adapter_factory,
                                                       base_model, prompts):
    wide = store.register(adapter_factory(**ADAPTERS["wide"]), "wide")
    qv = store.register(adapter_factory(**ADAPTERS["qv"]), "qv")
    prompt = prompts[0]
    assert len(prompt) > 16  # chunked prefill
    cases = [(None, None), (wide, wide.path), (qv, qv.path)]
    wanted = [peft_reference(base_model, prompt, path) for _, path in cases]
    assert len({tuple(w) for w in wanted}) == 3, "adapters must change the greedy output"

    async def go():
        return await asyncio.gather(*(collect(engine, request(prompt, rec)) for rec, _ in cases))

    results = run(go())
    for (record, _), want, (got, chunks) in zip(cases, wanted, results, strict=True):
        label = record.name if record else "base"
        assert got == want, label
        assert len(chunks) > 1, f"{label}: tokens were not streamed"
        assert chunks[0].prompt_tokens == len(prompt)
        assert chunks[-1].finish_reason in ("stop", "length")
        if record is not None:
            assert chunks[0].adapter_load_s > 0  # cold: loaded for this request
    warm, _ = run(collect(engine, request(prompt, wide)))
    assert warm == wanted[1]
    assert "wide@1" in engine.health().resident_adapters


def test_shared_prompt_prefix_is_reused_per_adapter_with_exact_output(
        engine, store, adapter_factory, base_model, prompts):
    # Both prompts start with the template's system turn (27 tokens: three 8-token blocks).
    fresh = store.register(adapter_factory(seed=50, r=4, scale=0.3), "prefixed")
    hits = lambda: engine.stats()["prefix_hit_tokens"]  # noqa: E731

    def served(prompt, record=None):
        before = hits()
        tokens, _ = run(collect(engine, request(prompt, record)))
        return tokens, hits() - before

    served(prompts[0])
    tokens, reused = served(prompts[1])
    assert reused >= 16
    assert tokens == peft_reference(base_model, prompts[1])
    tokens, reused = served(prompts[0], fresh)
    assert reused == 0, "an adapter must not reuse the base's keys and values"
    tokens, reused = served(prompts[1], fresh)
    assert reused >= 16
    assert tokens == peft_reference(base_model, prompts[1], fresh.path)


def test_four_adapters_batched_together_return_their_solo_output(engine, store,
                                                                 adapter_factory, prompts):
    records = [store.register(adapter_factory(**spec), name) for name, spec in ADAPTERS.items()]
    for record in records:
        assert run(engine.load_adapter(record)) >= 0.0
    prompt = prompts[1]
    solo = [run(collect(engine, request(prompt, rec)))[0] for rec in records]
    assert len({tuple(s) for s in solo}) == 4, "each adapter must give its own output"
    before = engine.stats()

    async def together():
        return await asyncio.gather(*(collect(engine, request(prompt, rec)) for rec in records))

    mixed = [tokens for tokens, _ in run(together())]
    after = engine.stats()
    assert mixed == solo
    assert after["mixed_steps"] > before["mixed_steps"]
    assert after["max_adapters_in_step"] >= 4


def test_new_version_registered_while_streaming(engine, store, adapter_factory, prompts):
    v1 = store.register(adapter_factory(seed=11, r=8, scale=0.3), "bot")
    prompt = prompts[1]

    async def go():
        resolved = store.resolve("smollm2+bot").adapter
        assert resolved.version == 1
        streams = [engine.generate(request(prompt, resolved)) for _ in range(3)]
        firsts = [await s.__anext__() for s in streams]  # all three are streaming now
        v2 = store.register(adapter_factory(seed=12, r=8, scale=0.3), "bot")
        rests = await asyncio.gather(*(_drain(s) for s in streams))
        old = [f.token_ids + rest for f, rest in zip(firsts, rests, strict=True)]
        before = set(engine.health().resident_adapters)
        newest = store.resolve("smollm2+bot").adapter
        tokens, chunks = await collect(engine, request(prompt, newest))
        return v2, old, newest, tokens, chunks, before

    v2, old, newest, tokens, chunks, before = run(go())
    assert newest.version == v2.version == 2
    assert old[0] == old[1] == old[2]
    assert tokens != old[0], "the new version must give its own output"
    assert chunks[0].adapter_load_s > 0
    # bot@1 served its streams to the end and stays resident while a slot is free; with every
    # slot taken (the module's engine holds earlier tests' adapters), bot@1, superseded, is the
    # one evicted for bot@2, not the least recently used of the others.
    assert "bot@1" in before
    kept = before if len(before) < 4 else before - {"bot@1"}
    assert set(engine.health().resident_adapters) == kept | {"bot@2"}
    assert v1.version == 1


async def _drain(stream):
    return [t async for chunk in stream for t in chunk.token_ids]


def test_lru_eviction_pinning_and_host_memory_reloads(base_info, store, adapter_factory, prompts):
    recs = {n: store.register(adapter_factory(seed=20 + i, r=4, scale=0.2), n)
            for i, n in enumerate("abcd")}
    engine = start_engine(base_info, max_adapters=2)
    try:
        async def go():
            await engine.load_adapter(recs["a"])
            await engine.load_adapter(recs["b"])
            b_first, _ = await collect(engine, request(prompts[1], recs["b"], max_tokens=4))
            await collect(engine, request(prompts[1], recs["a"], max_tokens=2))  # a: recent
            await engine.load_adapter(recs["c"])  # evicts b, the least recently used
            assert sorted(engine.health().resident_adapters) == ["a@1", "c@1"]
            pinned = engine.generate(request(prompts[1], recs["c"], max_tokens=400,
                                             stop_token_ids=[]))
            await pinned.__anext__()
            with pytest.raises(Conflict):
                await engine.unload_adapter("c@1")
            await engine.load_adapter(recs["d"])  # evicts a, never the pinned c
            assert sorted(engine.health().resident_adapters) == ["c@1", "d@1"]
            await engine.load_adapter(recs["b"])  # evicts d; b comes back from host memory
            assert sorted(engine.health().resident_adapters) == ["b@1", "c@1"]
            assert engine.stats()["adapter_host_hits"] == 1
            b_again, _ = await collect(engine, request(prompts[1], recs["b"], max_tokens=4))
            assert b_again == b_first
            await pinned.aclose()
            for _ in range(200):
                if engine.health().running == 0:
                    break
                await asyncio.sleep(0.05)
            assert await engine.unload_adapter("c@1") is True  # asked for: no copy kept
            assert await engine.unload_adapter("c@1") is False
            await engine.load_adapter(recs["c"])
            assert engine.stats()["adapter_host_hits"] == 1

        run(go())
        assert engine.stats()["adapter_evictions"] >= 3
    finally:
        run(engine.shutdown(drain_timeout_s=5))


def test_an_adapter_unloads_as_soon_as_its_last_stream_has_ended(engine, store,
                                                                  adapter_factory, prompts):
    # The finished row leaves the batch at the next step; its pin must not outlive the stream,
    # or an unload sent right after the answer gets a 409 for a request that is over.
    record = store.register(adapter_factory(seed=61, r=4, scale=0.2), "unpin")
    key = adapter_key(record)

    async def go():
        for i in range(10):
            pins = []
            async for chunk in engine.generate(request(prompts[i % 2], record, max_tokens=3,
                                                       stop_token_ids=[])):
                if chunk.finish_reason is not None:  # read at once, before anything else runs
                    pins.append(engine._cache.get(key).pins)
            assert pins == [0]
            await asyncio.gather(*(collect(engine, request(prompts[j % 2], record,
                                                           max_tokens=3, stop_token_ids=[]))
                                   for j in range(6)))
            assert await engine.unload_adapter(key) is True

    run(go())


def test_overloaded_abort_and_drain(base_info, store, prompts):
    engine = start_engine(base_info, max_running=1, max_queue=1)
    try:
        async def go():
            first = engine.generate(request(prompts[1], max_tokens=400, stop_token_ids=[]))
            await first.__anext__()  # running: holds the only slot
            second = engine.generate(request(prompts[1], max_tokens=3))  # waits in the queue
            with pytest.raises(Overloaded) as info:
                engine.generate(request(prompts[1], max_tokens=3))
            assert info.value.retry_after_s >= 1
            assert engine.health().waiting == 1
            await engine.abort(first.request_id)
            rest = [c async for c in first]
            assert rest[-1].finish_reason == "abort"
            tokens, = [t for c in [c async for c in second] for t in c.token_ids],
            assert len(tokens) == 3
            third = engine.generate(request(prompts[1], max_tokens=400, stop_token_ids=[]))
            await third.__anext__()
            await third.aclose()  # a client that goes away frees its slot
            for _ in range(200):
                if engine.health().running == 0:
                    break
                await asyncio.sleep(0.05)
            assert engine.health().running == 0
            # Drain: a running request finishes, new ones are refused.
            last = engine.generate(request(prompts[1], max_tokens=4, stop_token_ids=[]))
            drain = asyncio.create_task(engine.shutdown(drain_timeout_s=60))
            got = [c async for c in last]
            await drain
            assert got[-1].finish_reason == "length"
            assert sum(len(c.token_ids) for c in got) == 4
            with pytest.raises(EngineUnavailable):
                engine.generate(request(prompts[1]))

        run(go())
    finally:
        run(engine.shutdown(drain_timeout_s=1))


def test_refusals_and_sampling(engine, store, adapter_factory, prompts):
    dora = store.register(adapter_factory(seed=5, r=4, use_dora=True), "dora")
    with pytest.raises(Unsupported):
        run(_start(engine, request(prompts[1], dora)))
    too_long = [1] * 600
    with pytest.raises(InvalidInput) as info:
        run(_start(engine, request(too_long)))
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(InvalidInput):
        run(_start(engine, request([1, 10**9])))

    params = dict(temperature=0.9, top_p=0.9, seed=7, logprobs=True, top_logprobs=3)
    one, chunks = run(collect(engine, request(prompts[0], max_tokens=8, **params)))
    two, _ = run(collect(engine, request(prompts[0], max_tokens=8, **params)))
    assert one == two  # same seed, same tokens
    logprobs = [lp for c in chunks for lp in (c.logprobs or [])]
    tops = [t for c in chunks for t in (c.top_logprobs or [])]
    assert len(logprobs) == len(tops) == len(one)
    assert all(lp <= 0 for lp in logprobs) and all(len(t) == 3 for t in tops)


async def _start(engine, req):
    stream = engine.generate(req)
    await stream.aclose()


def test_request_timeout(base_info, prompts):
    engine = start_engine(base_info, max_running=1, options={"request_timeout_s": 4.0})
    try:
        async def go():
            # Submitted together: the first runs, the second waits for the only slot; both
            # reach their deadline in the same step.
            running = engine.generate(request(prompts[1], max_tokens=2000, stop_token_ids=[]))
            waiting = engine.generate(request(prompts[1], max_tokens=2))
            chunks = [c async for c in running]
            assert chunks[-1].finish_reason == "abort"  # stopped at its deadline
            with pytest.raises(Overloaded):  # still waiting at its deadline
                await waiting.__anext__()

        run(go())
        assert engine.stats()["timeouts"] == 2
    finally:
        run(engine.shutdown(drain_timeout_s=1))


def test_changed_adapter_files_are_refused(engine, store, adapter_factory, prompts):
    import os
    import stat

    from hub.errors import StoreCorrupt

    record = store.register(adapter_factory(seed=30, r=4), "tampered")
    weights = record.path / "adapter_model.safetensors"
    os.chmod(weights, stat.S_IRUSR | stat.S_IWUSR)
    with open(weights, "r+b") as fh:  # flip one byte inside the tensor data
        fh.seek(-3, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-3, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))

    async def go():
        stream = engine.generate(request(prompts[1], record, max_tokens=2))
        with pytest.raises(StoreCorrupt):
            await stream.__anext__()

    run(go())
    assert "tampered@1" not in engine.health().resident_adapters


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_adapter_weights_are_refused(engine, store, adapter_factory, prompts, bad):
    from safetensors.torch import load_file, save_file

    folder = adapter_factory(seed=31, r=4)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(k for k in tensors if "lora_B" in k)[5]
    tensors[name][1, 2] = float(bad)
    save_file(tensors, weights, metadata={"format": "pt"})
    record = store.register(folder, f"nonfinite-{bad.strip('-')}{'-neg' if '-' in bad else ''}")

    async def go():
        stream = engine.generate(request(prompts[1], record, max_tokens=2))
        with pytest.raises(InvalidInput, match="NaN or inf"):
            await stream.__anext__()

    run(go())
    assert f"{record.name}@1" not in engine.health().resident_adapters


def test_finite_values_whose_sum_overflows_are_not_called_non_finite():
    import torch
    from safetensors.torch import save

    from serve.runtime.adapter_files import _all_finite

    tensors = {"a": torch.full((4, 4), 3e38), "b": torch.zeros(4, 4)}
    data = save(tensors)
    assert _all_finite(data, tensors)  # the sum is inf; the element-wise check decides
    tensors["b"][0, 0] = float("nan")
    assert not _all_finite(save(tensors), tensors)
    mixed = {"a": torch.ones(2, dtype=torch.float16), "b": torch.tensor([1.0, float("inf")])}
    assert not _all_finite(save(mixed), mixed)


CAPABILITY_CASES = [
    ("dora", dict(use_dora=True)),
    ("modules_to_save", dict(modules_to_save=["lm_head"])),
    ("embedding lora", dict(targets_embeddings=True)),
    ("rank over cap", dict(rank=128)),
]


@pytest.mark.parametrize(("label", "caps"), CAPABILITY_CASES, ids=[c[0] for c in CAPABILITY_CASES])
def test_capabilities_refused_before_loading(label, caps, tmp_path):
    from hub.manifest import Capabilities
    from hub.store import AdapterRecord
    from serve.runtime.adapter_files import check_capabilities

    fields = dict(rank=8, alpha=16, target_modules=["q_proj"]) | caps
    record = AdapterRecord("x", 1, "smollm2", tmp_path, {}, Capabilities(**fields))
    with pytest.raises(Unsupported):
        check_capabilities(record, max_rank=64)


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    import json

    from serve.runtime.base import check_architecture

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(Unsupported) as info:
        check_architecture(tmp_path)
    assert "gpt2" in info.value.message


def test_auto_on_cpu_serves_the_4bit_values_qlora_adapters_trained_on(base_info, base_model, store,
                                                                      adapter_factory, prompts):
    """``auto`` on CPU serves ``nf4-dense`` weights; in fp32 compute, greedy output equals PEFT on
    the dequantised NF4 base (the compute dtype itself is measured: see the next test). Decode
    passes of up to 4 rows run by the 4-bit codes here (`serve.runtime.nf4_kernel`, forced: by
    default it is used where it measures faster), prefills by the dense weights."""
    from hub.nf4 import dense_nf4_model

    record = store.register(adapter_factory(**ADAPTERS["wide"]), "wide")
    dense = dense_nf4_model(base_info.path)
    wanted = [peft_reference(dense, p, path) for p in prompts for path in (None, record.path)]
    unquantised = [peft_reference(base_model, p, path)
                   for p in prompts for path in (None, record.path)]
    assert wanted != unquantised, "the 4-bit values must change some greedy output"
    config = EngineConfig(base=base_info, max_model_len=512,  # base_dtype="auto"
                          options={"compute_dtype": "fp32", "nf4_kernel_rows": 4})
    engine = create_engine("peft", config)
    run(engine.start())
    try:
        assert "weights=nf4-dense compute=fp32" in engine.health().detail
        if native.library() is not None:  # without a C compiler the dense path serves alone
            assert "4-bit-code kernel up to 4 rows" in engine.health().detail

        async def go():
            return [(await collect(engine, request(p, rec)))[0]
                    for p in prompts for rec in (None, record)]

        assert run(go()) == wanted
    finally:
        run(engine.shutdown(drain_timeout_s=5))
