"""The llamacpp engine in-process: the embedded Q4_1 GGUF base and real PEFT adapters converted by
export's GGUF LoRA writer, switched on one loaded model.

Agreement with the PEFT reference is in test_engines_parity.py; here: switching adapters without
reloading the base (and without reusing the previous adapter's prompt cache), conversion cache,
serial queue, abort, refusals, stop tokens, logprobs and seeded sampling.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed in this interpreter")

from hub.errors import Conflict, EngineUnavailable, InvalidInput, Overloaded, Unsupported  # noqa: E402
from serve.engine import EngineConfig, GenerationRequest, SamplingParams, create_engine  # noqa: E402

EOS = 2
_ids = itertools.count()


def run(coro):
    return asyncio.run(coro)


def request(prompt, record=None, max_tokens=12, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("stop_token_ids", [EOS])
    return GenerationRequest(f"lc-{next(_ids)}", list(prompt), record,
                             SamplingParams(max_tokens=max_tokens, **params))


async def collect(engine, req):
    chunks = [chunk async for chunk in engine.generate(req)]
    return [t for c in chunks for t in c.token_ids], chunks


@pytest.fixture(scope="module")
def lc_store(base_info, tmp_path_factory):
    from hub.store import Store
    from tests.conftest import TEST_CACHE

    return Store(tmp_path_factory.mktemp("llamacpp-home"), cache=TEST_CACHE / "bases")


@pytest.fixture(scope="module")
def records(lc_store, adapter_factory):
    return {
        "alpha": lc_store.register(adapter_factory(seed=31, r=8, scale=0.25), "alpha"),
        "beta": lc_store.register(adapter_factory(seed=32, r=16, targets="all-linear",
                                                  scale=0.15), "beta"),
    }


@pytest.fixture(scope="module")
def prompts(base_info):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_info.path)

    def chat(text: str) -> list[int]:
        return list(tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
            return_dict=False))

    return [chat("Write a short poem about the sea."), chat("What is two plus two?")]


@pytest.fixture(scope="module")
def engine(base_info, lc_store, tmp_path_factory):
    cache = tmp_path_factory.mktemp("lora-gguf")
    config = EngineConfig(base=base_info, max_model_len=512, max_adapters=2, max_queue=2,
                          options={"cache_dir": str(cache)})
    engine = create_engine("llamacpp", config)
    run(engine.start())
    yield engine
    run(engine.shutdown(drain_timeout_s=5))


def test_adapters_switch_on_one_model_without_stale_prompt_cache(engine, records, prompts):
    alpha, beta = records["alpha"], records["beta"]
    model = engine._llm.model
    prompt = prompts[0]

    async def go():
        return [await collect(engine, request(prompt, rec))
                for rec in (alpha, beta, alpha, None, beta)]

    (a1, chunks), (b1, _), (a2, _), (base, _), (b2, _) = run(go())
    assert len({tuple(a1), tuple(b1), tuple(base)}) == 3, "each adapter must change the output"
    # Same prompt right after another adapter: a reused prompt cache would change these.
    assert a2 == a1 and b2 == b1
    assert engine._llm.model is model, "the base must not be reloaded"
    assert sorted(engine.health().resident_adapters) == ["alpha@1", "beta@1"]
    assert chunks[0].prompt_tokens == len(prompt)
    assert chunks[0].adapter_load_s > 0
    assert len(chunks) > 1 and chunks[-1].finish_reason in ("stop", "length")


def test_lora_gguf_cached_per_version_and_lru(engine, records, lc_store, adapter_factory,
                                              prompts):
    alpha = records["alpha"]
    path = engine.lora_path(alpha)
    run(engine.load_adapter(alpha))
    assert path.is_file() and path.parent.name == "alpha"
    mtime = path.stat().st_mtime_ns
    assert run(engine.load_adapter(alpha)) == 0.0  # resident
    gamma = lc_store.register(adapter_factory(seed=33, r=4, scale=0.3), "gamma")
    run(engine.load_adapter(gamma))  # max_adapters=2: evicts the least recently used
    resident = engine.health().resident_adapters
    assert len(resident) == 2 and "gamma@1" in resident
    assert run(engine.unload_adapter("gamma@1")) is True
    assert run(engine.unload_adapter("gamma@1")) is False
    tokens, chunks = run(collect(engine, request(prompts[1], alpha, max_tokens=4)))
    assert len(tokens) >= 1
    assert path.stat().st_mtime_ns == mtime, "the converted file is reused, not rewritten"


def test_serial_queue_overload_abort_and_pinning(engine, records, prompts):
    alpha, beta = records["alpha"], records["beta"]

    async def go():
        running = engine.generate(request(prompts[0], alpha, max_tokens=300, stop_token_ids=[]))
        first = await running.__anext__()
        assert first.token_ids and engine.health().running == 1
        queued = [engine.generate(request(prompts[1], rec, max_tokens=3)) for rec in (beta, None)]
        with pytest.raises(Overloaded):  # max_queue=2 are waiting
            engine.generate(request(prompts[1], max_tokens=3))
        assert engine.health().waiting == 2
        with pytest.raises(Conflict):  # beta has a queued request
            await engine.unload_adapter("beta@1")
        await engine.abort(running.request_id)
        rest = [c async for c in running]
        assert rest[-1].finish_reason == "abort"
        outs = [[t async for c in stream for t in c.token_ids] for stream in queued]
        assert [len(o) for o in outs] == [3, 3]
        # A client that goes away: closing the stream frees the worker for the next request.
        gone = engine.generate(request(prompts[0], max_tokens=300, stop_token_ids=[]))
        await gone.__anext__()
        await gone.aclose()
        tokens, _ = await collect(engine, request(prompts[1], max_tokens=2))
        assert len(tokens) == 2
        for _ in range(100):  # the worker updates its counters just after the last chunk
            if engine.health().running == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.health().running == 0 and engine.health().waiting == 0

    run(go())


def test_stop_token_logprobs_and_seeded_sampling(engine, records, prompts):
    greedy, _ = run(collect(engine, request(prompts[1], records["beta"], max_tokens=6,
                                            stop_token_ids=[])))
    stop = greedy[2]
    tokens, chunks = run(collect(engine, request(prompts[1], records["beta"], max_tokens=6,
                                                 stop_token_ids=[stop])))
    assert tokens == greedy[:greedy.index(stop)]
    assert chunks[-1].finish_reason == "stop"

    _, chunks = run(collect(engine, request(prompts[1], max_tokens=4, logprobs=True,
                                            top_logprobs=3)))
    for chunk in chunks:
        for token, logprob, top in zip(chunk.token_ids, chunk.logprobs, chunk.top_logprobs,
                                       strict=True):
            assert logprob <= 0 and len(top) == 3
            assert max(top, key=top.get) == token  # greedy picks the most likely token
            assert abs(top[token] - logprob) < 1e-6

    params = dict(temperature=0.9, top_p=0.9, seed=7, max_tokens=8, stop_token_ids=[])
    one, _ = run(collect(engine, request(prompts[0], records["alpha"], **params)))
    two, _ = run(collect(engine, request(prompts[0], records["alpha"], **params)))
    assert one == two and len(one) == 8


def test_refusals(engine, lc_store, adapter_factory, base_info, prompts):
    dora = lc_store.register(adapter_factory(seed=34, r=4, use_dora=True), "dora")
    saved = lc_store.register(adapter_factory(seed=35, r=4, modules_to_save=["lm_head"]),
                              "saved")
    for record in (dora, saved):
        with pytest.raises(Unsupported):
            engine.generate(request(prompts[1], record))
        with pytest.raises(Unsupported):
            run(engine.load_adapter(record))
    with pytest.raises(InvalidInput) as info:
        engine.generate(request([1] * 600))
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(InvalidInput):
        engine.generate(request([1, 10**9]))
    with pytest.raises(InvalidInput):  # the GGUF decides the weight types
        create_engine("llamacpp", EngineConfig(base=base_info, base_dtype="fp32"))
    with pytest.raises(InvalidInput):
        create_engine("llamacpp", EngineConfig(base=base_info, options={"n_btch": "4"}))
    stopped = create_engine("llamacpp", EngineConfig(base=base_info))
    with pytest.raises(EngineUnavailable):
        stopped.generate(request(prompts[1]))


def test_drain_finishes_the_running_request_then_refuses(engine, prompts):
    # Last in this module: it stops the shared engine.
    async def go():
        last = engine.generate(request(prompts[1], max_tokens=4, stop_token_ids=[]))
        drain = asyncio.create_task(engine.shutdown(drain_timeout_s=60))
        got = [c async for c in last]
        await drain
        return got

    got = run(go())
    assert got[-1].finish_reason == "length" and sum(len(c.token_ids) for c in got) == 4
    with pytest.raises(EngineUnavailable):
        engine.generate(request(prompts[1]))
    assert engine.health().status == "draining"
