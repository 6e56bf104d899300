"""Ray Serve scale-out on one machine: routing by adapter, Ray's LRU, spill-over, restarts.

One app for the module (`tests.ray.conftest.ray_app`): 2 engine replicas at 0.5 CPU, 2
adapters each, adapters on the stand-in Hub. The tests run in file order and share the app, so
each one reads the replicas' state from the ``x-loradock-replica`` header and ``/metrics``
rather than assuming where Ray put an adapter.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.ray.conftest import MAX_ONGOING, WEIGHTS, wait_ready

pytestmark = pytest.mark.timeout(600)
HEADER = "x-loradock-replica"
ASK = [{"role": "user", "content": "Name a colour."}]
NO_END = {"0": -100, "2": -100}  # SmolLM2's <|endoftext|> and <|im_end|>: run to max_tokens


def chat(url: str, model: str, max_tokens: int = 4, **extra) -> httpx.Response:
    """One greedy chat completion over plain HTTP (the header is what several tests read)."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": ASK, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=300)


def resident(url: str) -> dict[str, set[str]]:
    """``{replica: {NAME@V}}`` from /metrics (as each replica last reported)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, set[str]] = {}
    for replica, key in re.findall(
            r'loradock_replica_adapter_resident\{replica="([^"]+)",adapter="([^"]+)"\} 1', text):
        out.setdefault(replica, set()).add(key)
    for replica in re.findall(r'loradock_replica_adapters_resident\{replica="([^"]+)"\}', text):
        out.setdefault(replica, set())
    return out


def test_repeated_requests_for_one_adapter_stay_on_one_replica(ray_app):
    first = chat(ray_app.url, "smollm2+alpha@1")
    assert first.status_code == 200, first.text
    replica = first.headers[HEADER]
    assert ray_app.downloads("alpha") == 1
    for _ in range(4):
        again = chat(ray_app.url, "smollm2+alpha@1")
        assert again.status_code == 200, again.text
        assert again.headers[HEADER] == replica
    assert again.json()["model"] == "smollm2+alpha@1"
    assert ray_app.downloads("alpha") == 1  # resident: no second pull
    assert "alpha@1" in resident(ray_app.url)[replica]


def test_a_burst_spills_to_the_second_replica_which_loads_lazily(ray_app):
    holder = chat(ray_app.url, "smollm2+alpha@1").headers[HEADER]
    jobs = 6 * MAX_ONGOING
    with ThreadPoolExecutor(jobs) as pool:
        answers = list(pool.map(lambda _: chat(ray_app.url, "smollm2+alpha@1", 24), range(jobs)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    served = {a.headers[HEADER] for a in answers}
    assert len(served) == 2 and holder in served, served
    (other,) = served - {holder}
    assert ray_app.downloads("alpha") == 2  # the second replica pulled its own copy, once
    assert "alpha@1" in resident(ray_app.url)[other]


def test_a_third_adapter_evicts_the_least_recently_used_and_the_engine_unloads_it(ray_app):
    url = ray_app.url
    # Make each replica's LRU order known: every replica holds alpha; give each a second one.
    order: dict[str, list[str]] = {r: ["alpha@1"] for r in resident(url)}
    for name, seed in (("beta", 2), ("gamma", 3), ("epsilon", 10)):
        if all(len(keys) == 2 for keys in order.values()):
            break
        if name == "epsilon":
            ray_app.publish(name, seed)
        answer = chat(url, f"smollm2+{name}@1")
        assert answer.status_code == 200, answer.text
        order[answer.headers[HEADER]].append(f"{name}@1")
        assert ray_app.downloads(name) == 1
    assert all(len(keys) == 2 for keys in order.values()), order
    ray_app.publish("delta", 4)
    answer = chat(url, "smollm2+delta@1")  # a third adapter on a replica holding two
    assert answer.status_code == 200, answer.text
    landed = answer.headers[HEADER]
    evicted = order[landed].pop(0)  # Ray's LRU: the one used first goes ...
    order[landed].append("delta@1")
    assert resident(url)[landed] == set(order[landed])  # ... and the engine unloaded it
    assert ray_app.downloads("delta") == 1
    # Once an evicted adapter is resident nowhere (its files went with it), asking for it
    # again reloads it on one replica: one counted remote download.
    gone: set[str] = set()
    for name, seed in (("zeta", 11), ("eta", 12)):
        held = {key for keys in resident(url).values() for key in keys}
        gone = {"alpha@1", "beta@1", "gamma@1", "epsilon@1"} & (
            {k for keys in order.values() for k in keys} | {evicted}) - held
        if gone:
            break
        ray_app.publish(name, seed)
        assert chat(url, f"smollm2+{name}@1").status_code == 200
    assert gone, resident(url)
    reload = sorted(gone)[0]
    before = ray_app.downloads(reload.split("@")[0])
    back = chat(url, f"smollm2+{reload}")
    assert back.status_code == 200, back.text
    assert reload in resident(url)[back.headers[HEADER]]
    assert ray_app.downloads(reload.split("@")[0]) == before + 1


def test_openai_client_stream_and_non_stream_and_metrics(ray_app):
    client = openai.OpenAI(base_url=ray_app.url + "/v1", api_key="none", max_retries=0)
    whole = client.chat.completions.create(model="smollm2+beta@1", messages=ASK, max_tokens=8,
                                           temperature=0)
    parts = client.chat.completions.create(model="smollm2+beta@1", messages=ASK, max_tokens=8,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True})
    chunks = list(parts)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed and streamed
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    body = {"model": "smollm2+beta@1", "messages": ASK, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", ray_app.url + "/v1/chat/completions", json=body,
                      timeout=300) as sse:  # streamed responses name their replica too
        assert sse.status_code == 200 and sse.headers[HEADER]
        assert sse.read().decode().rstrip().endswith("data: [DONE]")
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    shaped = client.chat.completions.create(  # the grammar is compiled again on the replica
        model="smollm2+beta@1", messages=ASK, max_tokens=32, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "c", "schema": schema, "strict": True}})
    assert json.loads(shaped.choices[0].message.content)["colour"] in ("red", "blue")
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="smollm2+ghost", messages=ASK, max_tokens=2)
    assert missing.value.code == "model_not_found"
    text = httpx.get(ray_app.url + "/metrics").text
    assert re.search(r'loradock_replica_adapters_resident\{replica="[^"]+"\} [12]', text)
    assert "loradock_requests_total" in text


def test_a_version_published_after_start_is_served_without_redeploying(ray_app):
    ray_app.publish("late", 5)
    first = chat(ray_app.url, "smollm2+late")
    assert first.status_code == 200, first.text
    assert first.json()["model"] == "smollm2+late@1"
    ray_app.publish("late", 6)  # v2
    deadline = time.monotonic() + 30  # the ingress re-reads tags after 2 s
    while (answer := chat(ray_app.url, "smollm2+late")).json().get("model") != "smollm2+late@2":
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.5)
    assert ray_app.downloads("late") == 2


def test_tampered_deleted_or_moved_remote_content_is_an_error_not_stale_output(ray_app):
    hub, url = ray_app.hub, ray_app.url
    ray_app.publish("tampered", 7)
    hub.tamper("acme/tampered", "v1", WEIGHTS, b"\0" * 64)
    bad = chat(url, "smollm2+tampered@1")
    assert bad.status_code == 502, bad.text
    assert bad.json()["error"]["code"] == "digest_mismatch"
    assert WEIGHTS in bad.json()["error"]["message"]

    ray_app.publish("gone", 8)
    with hub.lock:
        repo = hub.repos["acme/gone"]
        sha, files = repo.files_at("v1")
        del files[WEIGHTS]
        repo.pointers.pop((sha, WEIGHTS), None)
    gone = chat(url, "smollm2+gone@1")
    assert gone.status_code == 404, gone.text
    assert "acme/gone@v1" in gone.json()["error"]["message"]

    # Replicas holding moving@1 must not answer from it once the Hub's v1 names other content.
    ray_app.publish("moving", 9)
    for _ in range(4):  # bursts until both replicas hold it (Ray spills when one is full)
        with ThreadPoolExecutor(3 * MAX_ONGOING) as pool:
            list(pool.map(lambda _: chat(url, "smollm2+moving@1", 24, logit_bias=NO_END),
                          range(3 * MAX_ONGOING)))
        holders = [r for r, keys in resident(url).items() if "moving@1" in keys]
        if len(holders) == 2:
            break
    assert len(holders) == 2, resident(url)
    ray_app.publish("moving", 13)  # moving@2, tagged v2 ...
    with hub.lock:  # ... then v1 moved onto that commit behind loradock's back
        tags = hub.repos["acme/moving"].tags
        tags["v1"] = tags.pop("v2")
    time.sleep(2.5)  # past the ingress's tag TTL
    for _ in range(4):  # whichever replica Ray picks, it holds the old copy: refused
        refused = chat(url, "smollm2+moving@1")
        assert refused.status_code == 500, refused.text
        assert refused.json()["error"]["code"] == "store_corrupt"
        assert "moved" in refused.json()["error"]["message"]


def test_the_admin_load_route_prewarms_the_replica_ray_routes_that_content_to(ray_app):
    ray_app.publish("warmed", 14)
    loaded = httpx.post(ray_app.url + "/v1/adapters/warmed@1/load", timeout=300)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["id"] == "smollm2+warmed@1" and loaded.json()["load_time_s"] > 0
    assert ray_app.downloads("warmed") == 1
    answer = chat(ray_app.url, "smollm2+warmed@1")
    assert answer.status_code == 200, answer.text
    assert "warmed@1" in resident(ray_app.url)[answer.headers[HEADER]]
    assert ray_app.downloads("warmed") == 1  # the request found it resident


def test_after_ray_kill_serve_restarts_the_replica_and_output_matches_loradock_serve(
        ray_app, tmp_path):
    import ray

    from serve.server import BackgroundServer, ServerConfig

    models = ["smollm2", "smollm2+alpha@1", "smollm2+gamma@1"]
    victim = chat(ray_app.url, "smollm2+alpha@1").headers[HEADER]
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if f"#engine#{victim}" in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 300
    while True:  # Serve notices the dead replica and starts a new one
        live = {a["name"].rsplit("#", 1)[1] for a in ray.util.list_named_actors(
            all_namespaces=True) if "#engine#" in a["name"]}
        answers = [chat(ray_app.url, m, 16) for m in models]
        if len(live) == 2 and victim not in live and all(a.status_code == 200
                                                          for a in answers):
            break
        assert time.monotonic() < deadline, [a.text for a in answers]
        time.sleep(1)
    assert {a.headers.get(HEADER) for a in answers if a.headers.get(HEADER)} <= live
    wait_ready(ray_app.url)
    via_ray = {m: a.json()["choices"][0]["message"]["content"] for m, a in zip(models, answers,
                                                                                 strict=True)}
    config = ServerConfig(engine="peft", base_dtype="fp32", threads=1, port=0, ui=False,
                          remote="hf:acme", home=tmp_path / "single")
    with BackgroundServer(config) as url:
        single = {m: chat(url, m, 16).json()["choices"][0]["message"]["content"]
                  for m in models}
    assert via_ray == single
    assert all(via_ray.values())
