"""The console's pages over HTTP, in process with the FakeEngine (no browser, no model run).

Covers what the browser tests do not need a browser for: ``--no-ui``, the key rule (cookie or
header, same visibility as ``/v1/models``), ``/docs`` and ``/openapi.json`` behind keys, filters,
404s that do not tell hidden from missing, escaping of card text, and no off-host URL anywhere
in the console's files.
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from serve.http.app import create_app
from serve.http.auth import ApiKeys
from serve.ui import STATIC
from serve.ui.cards import render_card_text
from serve.ui.routes import TEMPLATES
from tests.serve.helpers import fake_state

ADMIN = "sk-ui-admin-0123456789"
TEAM = "sk-ui-team-0123456789"
KEYS = {ADMIN: {"name": "ops", "admin": True}, TEAM: {"name": "team", "adapters": ["team-*"]}}


@pytest.fixture(scope="module")
def registered(module_store, adapter_factory):
    module_store.register(adapter_factory(seed=1), "team-a")
    module_store.register(adapter_factory(seed=2), "team-a")
    module_store.register(adapter_factory(seed=3, r=4, targets=("q_proj",)), "secret")
    return module_store


@pytest.fixture(scope="module")
def open_client(registered, formatter):
    with TestClient(create_app(fake_state(registered, formatter))) as client:
        yield client


@pytest.fixture(scope="module")
def keyed_client(registered, formatter):
    state = fake_state(registered, formatter, keys=ApiKeys.from_mapping(KEYS))
    with TestClient(create_app(state)) as client:
        yield client


def _names(html: str) -> list[str]:
    return re.findall(r'<tr class="adapter" data-name="([^"]+)"', html)


def test_hub_lists_every_adapter_with_its_facts(open_client):
    page = open_client.get("/")
    assert page.status_code == 200
    assert _names(page.text) == ["secret", "team-a"]
    for version in (1, 2):
        assert f'href="/ui/adapters/team-a/{version}/"' in page.text
    assert "q_proj" in page.text and "4 / 16" in page.text  # rank / alpha of secret
    assert "not evaluated" in page.text and ">draft<" in page.text  # PEFT's template card


@pytest.mark.parametrize(("query", "expected"), [
    ("q=team", ["team-a"]), ("q=q_proj+v_proj", ["team-a"]), ("q=nothing-like-it", []),
    ("method=lora", ["secret", "team-a"]), ("method=sft", []), ("card=draft", ["secret", "team-a"]),
    ("card=none", []),
    ("card=ready", []), ("verdict=pass", []), ("resident=1", []),
])
def test_hub_filters(open_client, query, expected):
    assert _names(open_client.get("/?" + query).text) == expected


def test_hub_pages_keep_the_filters(open_client, monkeypatch):
    from serve.ui import routes

    monkeypatch.setattr(routes, "PAGE_SIZE", 1)
    first = open_client.get("/").text
    assert _names(first) == ["secret"] and "1–1 of 2" in first
    assert 'href="/?page=2" rel="next"' in first
    second = open_client.get("/?page=2").text
    assert _names(second) == ["team-a"] and 'href="/?page=1" rel="prev"' in second
    assert _names(open_client.get("/?page=99").text) == ["team-a"]  # the last page
    filtered = open_client.get("/?method=lora").text
    assert 'href="/?method=lora&amp;page=2"' in filtered
    assert open_client.get("/?page=0").status_code == 400


def test_adapter_page_versions_checksums_and_snippets(open_client, registered):
    record = registered.get("team-a", 1)
    page = open_client.get("/ui/adapters/team-a/1/")
    assert page.status_code == 200
    assert record.digest in page.text
    for sha in record.files.values():
        assert sha in page.text
    assert 'model="smollm2+team-a@1"' in page.text.replace("&#34;", '"')
    assert "loradock export ollama team-a@1 --out ollama-team-a" in page.text
    assert 'id="card-body"' in page.text  # PEFT's own README.md, rendered
    assert "has no <code>eval.json</code>" in page.text
    assert str(registered.home) not in page.text
    assert open_client.get("/ui/adapters/team-a/1/loss.png").status_code == 404


@pytest.mark.parametrize("path", ["/ui/adapters/team-a/9/", "/ui/adapters/no-such/1/",
                                  "/ui/adapters/..%2F..%2Fetc/1/", "/ui/adapters/A%20B/1/"])
def test_missing_adapter_pages_are_404(open_client, path):
    assert open_client.get(path).status_code == 404


def test_no_ui_turns_the_console_off_but_keeps_docs(registered, formatter):
    with TestClient(create_app(fake_state(registered, formatter), ui=False)) as client:
        assert client.get("/").status_code == 404
        assert client.get("/ui/playground").status_code == 404
        assert client.get("/docs").status_code == 200
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/v1/models").status_code == 200


def test_pages_ask_for_a_key_and_accept_cookie_or_header(keyed_client):
    for path in ("/", "/ui/playground", "/ui/server", "/ui/adapters/team-a/1/", "/docs"):
        page = keyed_client.get(path)
        assert page.status_code == 401 and 'id="key-form"' in page.text, path
        assert 'class="adapter"' not in page.text and "smollm2+team-a" not in page.text
    wrong = keyed_client.get("/", cookies={"loradock_key": "sk-not-a-key-at-all"})
    assert wrong.status_code == 401 and "not accepted" in wrong.text
    by_header = keyed_client.get("/", headers={"Authorization": f"Bearer {TEAM}"})
    by_cookie = keyed_client.get("/", cookies={"loradock_key": TEAM})
    assert by_header.status_code == by_cookie.status_code == 200
    assert _names(by_header.text) == _names(by_cookie.text) == ["team-a"]
    assert "team" in by_cookie.text  # the key's name is shown, never the key
    assert TEAM not in by_cookie.text


def test_limited_key_sees_what_v1_models_shows(keyed_client):
    for key in (TEAM, ADMIN):
        models = keyed_client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        ids = {m["id"] for m in models.json()["data"]}
        hub = keyed_client.get("/", cookies={"loradock_key": key}).text
        assert {f"smollm2+{n}" for n in _names(hub)} == ids - {"smollm2"}
        playground = keyed_client.get("/ui/playground", cookies={"loradock_key": key}).text
        assert set(re.findall(r'name="model" value="([^"]+)"', playground)) == ids
    hidden = keyed_client.get("/ui/adapters/secret/1/", cookies={"loradock_key": TEAM})
    missing = keyed_client.get("/ui/adapters/nothing/1/", cookies={"loradock_key": TEAM})
    assert hidden.status_code == missing.status_code == 404
    assert hidden.text.replace("secret", "nothing") == missing.text


def test_openapi_behind_keys_declares_bearer_auth(keyed_client):
    assert keyed_client.get("/openapi.json").status_code == 401
    schema = keyed_client.get("/openapi.json", headers={"Authorization": f"Bearer {TEAM}"})
    assert schema.status_code == 200
    body = schema.json()
    assert body["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert "/v1/chat/completions" in body["paths"]
    assert not any(p == "/" or p.startswith("/ui/") for p in body["paths"])
    docs = keyed_client.get("/docs", cookies={"loradock_key": TEAM})
    assert docs.status_code == 200 and "/ui/vendor/swagger-ui-bundle.js" in docs.text
    assert keyed_client.get("/ui/vendor/swagger-ui-bundle.js").status_code == 200


def test_nothing_is_fetched_from_another_host():
    for path in [*TEMPLATES.iterdir(), *STATIC.iterdir()]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(src|href)=\"(https?:)?//", text), path
        assert not re.search(r"fetch\(\s*[\"'`]https?:", text), path


def test_cli_no_ui_flag_reaches_the_server_config(monkeypatch):
    import serve.server
    from loradock import cli_serve

    seen = []
    monkeypatch.setattr(serve.server, "run_server", seen.append)
    cli_serve.main(["--no-ui", "--engine", "fake"])
    cli_serve.main(["--engine", "fake"])
    assert [c.ui for c in seen] == [False, True]


def test_card_text_is_escaped_and_unsafe_links_dropped():
    card = render_card_text(
        "---\nlicense: apache-2.0\ntags: [a, b]\nmodel-index:\n- name: x\n---\n"
        "# T\n\n## EU AI Act notes\n\n<script>alert(1)</script> [x](javascript:alert(1))\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert ("license", "apache-2.0") in card.header and ("tags", "a, b") in card.header
    assert "name: x" in dict(card.header)["model-index"]
    assert "<script>" not in card.body_html and "&lt;script&gt;" in card.body_html
    assert 'href="javascript' not in card.body_html
    assert '<h2 id="card-eu-ai-act-notes">' in card.body_html
    assert "<table>" in card.body_html
    assert card.sections == [("card-eu-ai-act-notes", "EU AI Act notes")]
    broken = render_card_text("---\nkey: [unclosed\n---\nbody\n")
    assert broken.error and "body" in broken.body_html
