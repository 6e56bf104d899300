"""Issue 15 acceptance: the web console in a real headless Chromium against a real server.

One ``loradock serve --engine peft`` process on 127.0.0.1 for the module, started with API keys
and three registered adapters: ``json-extract`` (the demo-like one: real LoRA, real `run_eval`,
manifest, loss.png, a card from `modelcards.write_card`), ``reply-style`` (another real LoRA that
answers differently) and ``support-faq`` (the only one the limited key may use). The browser
enters keys through the key page, as a person would. Screenshots of the hub, adapter and
playground pages go to docs/screenshots/.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import httpx
import pytest

from hub.store import Store
from tests.conftest import TEST_CACHE
from tests.modelcards.conftest import evaluated_adapter  # noqa: F401 - the shared fixture
from tests.serve.helpers import start_server
from tests.serve.ui_support import (
    chromium_browser,
    demo_like_folder,
    require_chromium,
    screenshot,
)

ADMIN = "sk-console-admin-4c1d9e7a"
SUPPORT = "sk-console-support-8b2f6d3e"
DEMO = "json-extract"
PROMPT = "Name as JSON: I am Eve."


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_factory, base_info, evaluated_adapter):  # noqa: F811
    require_chromium()
    root = tmp_path_factory.mktemp("ui-browser")
    store = Store(root / "home", cache=TEST_CACHE / "bases")
    store.register(demo_like_folder(evaluated_adapter, base_info, root, DEMO), DEMO)
    store.register(adapter_factory(seed=11, scale=0.08), "reply-style")
    store.register(adapter_factory(seed=12), "support-faq")
    keys = root / "keys.yaml"
    keys.write_text(f"{ADMIN}: {{name: ops, admin: true}}\n"
                    f"{SUPPORT}: {{name: support-team, adapters: ['support-*']}}\n")
    proc = start_server(store.home, engine="peft", args=[
        "--base-dtype", "fp32", "--api-keys", str(keys), "--max-model-len", "512",
        "--max-running", "4",
    ])
    yield proc, store
    proc.stop()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = chromium_browser(playwright)
        yield browser
        browser.close()


OFF_HOST: list[str] = []  # every request a page made to anywhere but the server


def _signed_in(browser, server, key: str):
    """A fresh browser context that entered ``key`` on the key page."""
    proc, _ = server
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.on("request", lambda r: None if r.url.startswith(proc.url + "/")
               else OFF_HOST.append(r.url))
    page = context.new_page()
    response = page.goto(proc.url + "/")
    assert response.status == 401 and page.locator("#key-form").is_visible()
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#adapters, .empty")
    return context, page


def _visible_ids(server, key: str) -> list[str]:
    proc, _ = server
    with proc.http(key) as http:
        return [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_hub_card_shows_eval_numbers_and_ai_act_section(server, browser):
    proc, store = server
    context, page = _signed_in(browser, server, ADMIN)
    try:
        assert page.inner_text("#key-name") == "ops"
        row = page.locator(f"tr.adapter[data-name='{DEMO}']")
        assert row.count() == 1
        assert "beats baseline" in row.inner_text() or "no gain" in row.inner_text()
        assert set(page.locator("tr.adapter").evaluate_all("rs => rs.map(r => r.dataset.name)")) \
            == {DEMO, "reply-style", "support-faq"}
        page.fill("#search", "json")  # live search
        assert page.locator("tr.adapter:visible").count() == 1
        page.fill("#search", "")

        row.locator("a.name").click()
        page.wait_for_selector("#adapter-title")
        record = store.get(DEMO)
        doc = json.loads((record.path / "eval.json").read_text())
        adapter = doc["systems"]["adapter"]
        table = page.inner_text("#eval-table")
        for key in ("exact_match", "rouge_l"):
            assert f"{adapter[key]:.4f}" in table, (key, table)
        assert doc["verdict"]["sentence"] in page.inner_text("#verdict")
        card = page.inner_text("#card-body")
        assert f"{adapter['exact_match']:.4f}" in card  # the card's own eval table
        worst = page.locator("#worst tbody tr")
        assert worst.count() == len(doc["worst_examples"]) > 0
        ai_act = page.locator("#card-body h2#card-eu-ai-act-notes")
        assert ai_act.inner_text() == "EU AI Act notes"
        assert "Art. 53(1)(c): copyright policy" in card and "Art. 50" in card
        assert page.locator("#card-header").inner_text().count("draft") >= 1
        assert page.evaluate("document.getElementById('loss-png').naturalWidth") > 0
        assert record.digest in page.inner_text("#versions-table")
        snippet = page.inner_text("#snippet-python")
        assert f'model="smollm2+{DEMO}@{record.version}"' in snippet
        assert f"{proc.url}/v1" in snippet
        assert page.inner_text("#snippet-ollama") == (
            f"loradock export ollama {DEMO}@{record.version} --out ollama-{DEMO}")
        assert "/root" not in page.content() and str(store.home) not in page.content()
        page.set_viewport_size({"width": 1360, "height": 1300})
        screenshot(page, "adapter")

        page.goto(proc.url + "/docs")  # Swagger UI from the vendored files
        page.wait_for_selector(".opblock-summary-path")
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert "/v1/chat/completions" in " ".join(paths)
    finally:
        context.close()
    assert OFF_HOST == []


def _metric(proc, name: str, route: str) -> float:
    text = httpx.get(proc.url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'route="{route}"' in line and 'status="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_playground_streams_three_different_answers(server, browser):
    proc, _ = server
    models = ["smollm2", f"smollm2+{DEMO}", "smollm2+reply-style"]
    before = _metric(proc, "loradock_requests_total", "/v1/chat/completions")
    context, page = _signed_in(browser, server, ADMIN)
    try:
        page.goto(proc.url + "/ui/playground?models=" + quote(",".join(models)))
        checked = page.locator("#model-picker input:checked").evaluate_all(
            "xs => xs.map(x => x.value)")
        assert checked == models
        page.fill("#user", PROMPT)
        page.fill("#max-tokens", "24")
        events: list[tuple[str, dict | None]] = []
        chat_url = proc.url + "/v1/chat/completions"
        page.on("request", lambda r: r.url == chat_url and events.append(
            ("sent", json.loads(r.post_data or "{}"))))
        page.on("requestfinished", lambda r: r.url == chat_url and events.append(
            ("finished", None)))
        page.click("#run")
        page.wait_for_function(
            "document.querySelectorAll('#columns .column.done').length === 3", timeout=240_000)
        answers = {}
        for column in page.locator("#columns .column").all():
            model = column.get_attribute("data-model")
            answers[model] = column.locator(".answer").inner_text()
            assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", column.locator(".ttft").inner_text())
            assert float(column.locator(".tps").inner_text()) > 0
            assert int(column.locator(".tokens").inner_text()) > 1
        assert sorted(answers) == sorted(models)
        assert [kind for kind, _ in events[:3]] == ["sent"] * 3  # all sent before any ended
        for _, body in events[:3]:
            assert body["stream"] is True and body["model"] in models
            assert body["messages"] == [{"role": "user", "content": PROMPT}]
            assert body["temperature"] == 0 and body["max_tokens"] == 24
        assert all(a.strip() for a in answers.values()), answers
        assert len(set(answers.values())) == 3, answers
        screenshot(page, "playground")
        page.goto(proc.url + "/")  # the two adapters are resident now, with their load times
        for name in (DEMO, "reply-style"):
            resident = page.inner_text(f"tr.adapter[data-name='{name}'] td.resident")
            assert re.search(r"v1 · loaded in \d+ ms|v1 · loaded in \d+\.\d\d s", resident)
        assert page.inner_text("#count-resident") == "2"
        screenshot(page, "hub")
    finally:
        context.close()
    # The three columns were three ordinary requests to the public route.
    assert _metric(proc, "loradock_requests_total", "/v1/chat/completions") == before + 3
    client = proc.client(api_key=ADMIN)
    again = client.chat.completions.create(
        model=f"smollm2+{DEMO}", messages=[{"role": "user", "content": PROMPT}],
        temperature=0, max_tokens=24)
    assert again.choices[0].message.content == answers[f"smollm2+{DEMO}"]


def test_playground_sends_turns_and_a_json_schema(server, browser):
    proc, _ = server
    context, page = _signed_in(browser, server, ADMIN)
    try:
        page.goto(proc.url + "/ui/playground?models=smollm2")
        sent: list[dict] = []
        page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and sent.append(
            json.loads(r.post_data or "{}")))
        page.fill("#system", "Answer as JSON.")
        page.fill("#user", "Who are you?")
        page.click("#add-turn")
        boxes = page.locator("#turns textarea")
        boxes.nth(1).fill('{"name": "Ann"}')
        boxes.nth(2).fill("And now as Bob?")
        page.select_option("#response-format", "json_schema")
        page.fill("#max-tokens", "8")
        page.click("#run")
        page.wait_for_function("document.querySelector('#columns .column .state')"
                               ".textContent.match(/done|error/)", timeout=120_000)
        assert [m["role"] for m in sent[0]["messages"]] == ["system", "user", "assistant", "user"]
        assert sent[0]["messages"][3]["content"] == "And now as Bob?"
        schema = sent[0]["response_format"]
        assert schema["type"] == "json_schema" and schema["json_schema"]["schema"]["required"] \
            == ["name"]
    finally:
        context.close()


def test_limited_key_sees_only_its_adapters(server, browser):
    proc, _ = server
    context, page = _signed_in(browser, server, SUPPORT)
    try:
        names = page.locator("tr.adapter").evaluate_all("rs => rs.map(r => r.dataset.name)")
        assert names == ["support-faq"]
        ids = _visible_ids(server, SUPPORT)
        assert ids == ["smollm2", "smollm2+support-faq"]
        assert DEMO not in page.content() and "reply-style" not in page.content()
        hidden = page.goto(proc.url + f"/ui/adapters/{DEMO}/1/")
        assert hidden.status == 404
        assert page.request.get(proc.url + f"/ui/adapters/{DEMO}/1/loss.png").status == 404
        page.goto(proc.url + "/ui/playground")
        choices = page.locator("#model-picker input").evaluate_all("xs => xs.map(x => x.value)")
        assert choices == ids
        page.goto(proc.url + "/ui/server")
        page.wait_for_function(
            "document.querySelector('[data-figure=requests]').textContent !== '–'")
        assert int(page.inner_text("[data-figure=requests]")) > 0
        assert page.request.get(proc.url + "/openapi.json").status == 200  # cookie
        page.click("#forget-key")
        page.wait_for_selector("#key-form")
    finally:
        context.close()
    assert OFF_HOST == []
    assert httpx.get(proc.url + "/openapi.json").status_code == 401
    docs = httpx.get(proc.url + "/docs")
    assert docs.status_code == 401 and "key-form" in docs.text
