"""The real server (``--engine peft --base-dtype fp32``) driven by the official openai client.

One server process for the module, started with API keys and five registered adapters. Covers
the issue's acceptance: greedy outputs equal PEFT's own (transformers fp32 + PeftModel +
generate) token for token, stream and non-stream, base and adapters; no cross-talk between
concurrent adapters; hot-swap of a new version under load; hostile bodies; per-key visibility
and keys never logged; SIGTERM during a stream (runs last and stops the server).
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

from hub.store import Store
from tests.conftest import TEST_CACHE
from tests.serve.helpers import (
    HOSTILE_BODIES,
    HOSTILE_PATHS,
    ServerProcess,
    check_envelope,
    start_server,
)

ADMIN = "sk-admin-acceptance-7f3a9c1e5b"
ALPHA_ONLY = "sk-alpha-only-acceptance-2d8e4b"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
MAX_TOKENS = 8
ADAPTERS = {"alpha": 1, "beta": 2, "gamma": 3, "delta": 4, "swap": 6}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, adapter_factory, base_info):
    root = tmp_path_factory.mktemp("openai-peft")
    store = Store(root / "home", cache=TEST_CACHE / "bases")
    records = {name: store.register(adapter_factory(seed=seed), name)
               for name, seed in ADAPTERS.items()}
    keys = root / "keys.yaml"
    keys.write_text(f"{ADMIN}: {{name: ops, admin: true}}\n"
                    f"{ALPHA_ONLY}: {{name: alpha-team, adapters: [alpha]}}\n")
    server = start_server(store.home, engine="peft", args=[
        "--base-dtype", "fp32", "--api-keys", str(keys), "--max-running", "8",
        "--max-adapters", "8", "--max-model-len", "512", "--drain-timeout-s", "120",
    ])
    yield server, store, records
    server.stop()


@pytest.fixture(scope="module")
def reference(base_model, setup):
    """PEFT's greedy continuation: ``reference(adapter_record_or_None, prompt_ids, n)``."""
    import torch
    from peft import PeftModel

    made: dict = {}

    def run(record, prompt_ids: list[int], max_new_tokens: int = MAX_TOKENS):
        key = (record.model if record else None, tuple(prompt_ids), max_new_tokens)
        if key in made:
            return made[key]
        model = base_model if record is None else PeftModel.from_pretrained(base_model,
                                                                             record.path)
        try:
            ids = torch.tensor([prompt_ids])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     do_sample=False, max_new_tokens=max_new_tokens,
                                     eos_token_id=[2], pad_token_id=2, output_scores=True,
                                     return_dict_in_generate=True)
        finally:
            if record is not None:
                model.unload()
        new = out.sequences[0, len(prompt_ids):].tolist()
        logprobs = [torch.log_softmax(score[0].float(), -1)[t].item()
                    for score, t in zip(out.scores, new, strict=True)]
        finish = "stop" if new and new[-1] == 2 else "length"
        if finish == "stop":
            new, logprobs = new[:-1], logprobs[:-1]
        made[key] = (new, logprobs, finish)
        return made[key]

    return run


@pytest.fixture(scope="module")
def tokenizer(base_info):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_info.path)


def _chat_ids(tokenizer) -> list[int]:
    result = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(result["input_ids"] if hasattr(result, "keys") else result)


def _model(name: str | None) -> str:
    return "smollm2" if name is None else f"smollm2+{name}"


@pytest.mark.parametrize("name", [None, "alpha", "beta"])
def test_non_stream_equals_peft_token_for_token(setup, reference, tokenizer, name):
    server, _, records = setup
    ref_ids, ref_logprobs, finish = reference(records.get(name), _chat_ids(tokenizer))
    reply = server.client(ADMIN).chat.completions.create(
        model=_model(name), messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
        logprobs=True,
    )
    choice = reply.choices[0]
    assert choice.message.content == tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert choice.finish_reason == finish
    assert reply.usage.completion_tokens == len(ref_ids)
    assert reply.model == (records[name].model if name else "smollm2")
    entries = choice.logprobs.content
    assert len(entries) == len(ref_ids)
    for entry, token_id, logprob in zip(entries, ref_ids, ref_logprobs, strict=True):
        piece = tokenizer.decode([token_id])
        if "\ufffd" not in piece:
            assert bytes(entry.bytes) == piece.encode("utf-8")
        assert entry.logprob == pytest.approx(logprob, abs=5e-3)


@pytest.mark.parametrize("name", [None, "alpha", "beta"])
def test_stream_equals_peft(setup, reference, tokenizer, name):
    server, _, records = setup
    ref_ids, _, finish = reference(records.get(name), _chat_ids(tokenizer))
    chunks = list(server.client(ADMIN).chat.completions.create(
        model=_model(name), messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref_ids)


def test_stop_string_and_top_logprobs_on_the_real_engine(setup, reference, tokenizer):
    server, _, records = setup
    ref_ids, ref_logprobs, _ = reference(records["beta"], _chat_ids(tokenizer))
    ref_text = tokenizer.decode(ref_ids, skip_special_tokens=True)
    stop = ref_text[len(ref_text) // 2:][:3]
    assert stop.strip(), ref_text
    reply = server.client(ADMIN).chat.completions.create(
        model="smollm2+beta", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
        stop=[stop], logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert choice.message.content == ref_text[:ref_text.index(stop)]
    assert choice.finish_reason == "stop"
    for entry, logprob in zip(choice.logprobs.content, ref_logprobs, strict=False):
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(logprob, abs=5e-3)


def test_completions_endpoint_equals_peft(setup, reference, tokenizer):
    server, _, records = setup
    prompt = "The three primary colours are"
    ref_ids, _, _ = reference(records["gamma"], tokenizer(prompt)["input_ids"])
    reply = server.client(ADMIN).completions.create(
        model="smollm2+gamma", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].text == tokenizer.decode(ref_ids, skip_special_tokens=True)


def test_no_cross_talk_between_concurrent_adapters(setup):
    server, _, _ = setup
    names = ["alpha", "beta", "gamma", "delta"]
    client = server.client(ADMIN)

    def ask(name: str) -> str:
        reply = client.chat.completions.create(model=_model(name), messages=MESSAGES,
                                               max_tokens=MAX_TOKENS, temperature=0)
        return reply.choices[0].message.content

    solo = {name: ask(name) for name in names}
    assert len(set(solo.values())) == len(names), f"adapters must differ to test this: {solo}"

    async def together() -> list[tuple[str, str]]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key=ADMIN, max_retries=0,
                                     timeout=300)

        async def one(name: str) -> tuple[str, str]:
            reply = await aclient.chat.completions.create(
                model=_model(name), messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
            return name, reply.choices[0].message.content

        try:
            return await asyncio.gather(*(one(n) for n in names * 2))
        finally:
            await aclient.close()

    for name, text in asyncio.run(together()):
        assert text == solo[name], name


def test_hot_swap_under_load(setup, reference, tokenizer, adapter_factory):
    server, store, records = setup
    client = server.client(ADMIN)
    results: list = []
    errors: list = []
    folder = adapter_factory(seed=5)  # made before the load starts: registering is then quick

    def stream_one() -> None:
        try:
            chunks = list(client.chat.completions.create(
                model="smollm2+swap", messages=MESSAGES, max_tokens=48, temperature=0,
                stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            results.append((chunks[0].model, text))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=stream_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while httpx.get(server.url + "/health").json()["running"] + len(results) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    new = store.register(folder, "swap")
    assert new.version == 2
    assert len(results) < 4, "the new version must be registered while requests stream"
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    assert len(results) == 4
    assert {model for model, _ in results} == {"smollm2+swap@1"}
    assert len({text for _, text in results}) == 1
    reply = client.chat.completions.create(model="smollm2+swap", messages=MESSAGES,
                                           max_tokens=MAX_TOKENS, temperature=0)
    assert reply.model == "smollm2+swap@2"
    ref_ids, _, _ = reference(new, _chat_ids(tokenizer))
    assert reply.choices[0].message.content == tokenizer.decode(ref_ids, skip_special_tokens=True)
    old_ids, _, _ = reference(records["swap"], _chat_ids(tokenizer))
    assert ref_ids != old_ids


def test_hostile_bodies_then_server_keeps_serving(setup):
    server, _, _ = setup
    with server.http(ADMIN) as http:
        for case, path, raw, status, param, code in HOSTILE_BODIES:
            response = http.post(HOSTILE_PATHS[path], content=raw,
                                 headers={"Content-Type": "application/json"})
            try:
                check_envelope(response, status, param, code)
            except AssertionError as exc:
                raise AssertionError(f"{case}: {exc}") from None
    reply = server.client(ADMIN).chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=2, temperature=0)
    assert reply.choices[0].message.content


def test_api_keys_limit_what_a_key_sees(setup):
    server, _, _ = setup
    limited = server.client(ALPHA_ONLY)
    assert [m.id for m in limited.models.list()] == ["smollm2", "smollm2+alpha"]
    admin_ids = {m.id for m in server.client(ADMIN).models.list()}
    assert {"smollm2+beta", "smollm2+swap", "smollm2+alpha"} <= admin_ids
    with pytest.raises(openai.NotFoundError) as forbidden:
        limited.chat.completions.create(model="smollm2+beta", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        limited.chat.completions.create(model="smollm2+betb", messages=MESSAGES, max_tokens=2)
    assert forbidden.value.response.text == missing.value.response.text.replace("betb", "beta")
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-not-a-real-key-000000").models.list()
    with pytest.raises(openai.PermissionDeniedError):
        limited.post("/adapters/alpha/load", cast_to=httpx.Response)
    assert limited.chat.completions.create(model="smollm2+alpha", messages=MESSAGES,
                                           max_tokens=2).choices[0].message.content is not None
    log = server.log_text()
    assert ADMIN not in log and ALPHA_ONLY not in log and "alpha-team" in log


def test_client_disconnect_frees_the_slot_and_metrics_count(setup):
    server, _, _ = setup
    with server.http(ADMIN) as http, http.stream(
        "POST", "/v1/chat/completions",
        json={"model": "smollm2+delta", "messages": MESSAGES, "max_tokens": 400,
              "temperature": 0.8, "seed": 1, "stream": True},
    ) as response:
        next(line for line in response.iter_lines() if '"content":"' in line)
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health").json()["running"]:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)
    metrics = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in httpx.get(server.url + "/metrics").text.splitlines()
               if line and not line.startswith("#")}
    assert metrics["loradock_client_disconnects_total"] >= 1
    assert metrics["loradock_time_to_first_token_seconds_count"] >= 10
    assert metrics["loradock_adapter_load_seconds_count"] >= 1
    assert metrics["loradock_adapters_resident"] >= 4
    assert metrics["loradock_completion_tokens_total"] > 50


def test_sigterm_during_stream_drains_and_exits_0(setup):
    """Runs last: stops the module's server."""
    server: ServerProcess = setup[0]
    stream = server.client(ADMIN).chat.completions.create(
        model="smollm2+alpha", messages=MESSAGES, max_tokens=24, temperature=0, stream=True)
    chunks = [next(stream)]
    server.proc.send_signal(15)
    chunks += list(stream)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert server.proc.wait(120) == 0
    log = server.log_text()
    assert ADMIN not in log and ALPHA_ONLY not in log
