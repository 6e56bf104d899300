"""API keys: file checks, constant-time lookup, per-key adapter visibility, admin routes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hub.errors import InvalidInput
from serve.http.app import create_app
from serve.http.auth import ApiKeys
from serve.server import ServerConfig
from tests.factories import set_base_reference
from tests.serve.helpers import (
    REPO,
    chat_body,
    check_envelope,
    fake_state,
    server_env,
)

SUPPORT = "sk-support-0123456789abcdef"
FAQ_V1 = "sk-faq-v1-0123456789abcdef"
ADMIN = "sk-admin-0123456789abcdef"
NO_BASE = "sk-nobase-0123456789abcdef"
KEYS_YAML = f"""
{SUPPORT}:
  name: support-team
  adapters: ["support-*"]
{FAQ_V1}: ["faq@1"]
{ADMIN}:
  name: ops
  admin: true
{NO_BASE}:
  adapters: ["support-*"]
  base: false
"""


@pytest.fixture(scope="module")
def keyed(module_store, formatter, adapter_factory, tmp_path_factory, base_info):
    for name, seed in (("support-en", 1), ("support-fr", 2), ("secret", 3), ("faq", 4),
                       ("faq", 5)):
        module_store.register(adapter_factory(seed=seed), name)
    module_store.add_base("otherbase", Path(base_info.path))
    foreign = tmp_path_factory.mktemp("foreign") / "foreign"
    shutil.copytree(adapter_factory(seed=1), foreign)
    set_base_reference(foreign, "otherbase")
    module_store.register(foreign, "foreign", base="otherbase")
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(KEYS_YAML)
    state = fake_state(module_store, formatter, keys=ApiKeys.load(path))
    with TestClient(create_app(state)) as client:
        yield client, state


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("text", "fragment"), [
    ("not: [a, mapping", "Cannot read"),
    ("- just\n- a list\n", "must map keys"),
    ("short: {}\n", "at least 12 characters"),
    ("sk-0123456789abcdef: {adapters: ['../x']}\n", "'adapters' must be a list"),
    ("sk-0123456789abcdef: {admin: 'yes'}\n", "'admin' must be true or false"),
    ("sk-0123456789abcdef: {colour: red}\n", "unknown settings"),
    ("sk-0123456789abcdef: {name: sk-0123456789abcdef}\n", "not the key itself"),
])
def test_bad_key_files_are_refused_without_showing_keys(tmp_path, text, fragment):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInput) as info:
        ApiKeys.load(path)
    assert fragment in info.value.message and info.value.param == "api_keys"
    assert "0123456789abcdef" not in info.value.one_line()


def test_authenticate(tmp_path):
    keys = ApiKeys.from_mapping({SUPPORT: {"adapters": ["support-*"]}, ADMIN: {"admin": True}})
    assert keys.authenticate(f"Bearer {ADMIN}").is_admin
    support = keys.authenticate(f"bearer  {SUPPORT}")
    assert not support.is_admin and support.may_use("support-x", 3)
    assert not support.may_use("secret", 1)
    for header in (None, "", "Bearer", f"Basic {SUPPORT}", "Bearer sk-wrong-0123456789abcdef",
                   f"Bearer {SUPPORT}x"):
        with pytest.raises(Exception) as info:
            keys.authenticate(header)
        assert info.value.http_status == 401
        assert SUPPORT not in info.value.one_line()


def test_missing_or_wrong_key_is_401(keyed):
    client, _ = keyed
    response = client.post("/v1/chat/completions", json=chat_body())
    check_envelope(response, 401, code="invalid_api_key")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    check_envelope(client.get("/v1/models", headers=_as("sk-wrong-0123456789abcdef")), 401)
    # health and metrics stay open
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_models_list_only_what_the_key_may_use(keyed):
    client, _ = keyed
    ids = {k: [c["id"] for c in client.get("/v1/models", headers=_as(k)).json()["data"]]
           for k in (SUPPORT, FAQ_V1, ADMIN, NO_BASE)}
    assert ids[SUPPORT] == ["smollm2", "smollm2+support-en", "smollm2+support-fr"]
    assert ids[FAQ_V1] == ["smollm2", "smollm2+faq@1"]
    assert set(ids[ADMIN]) >= {"smollm2", "smollm2+faq", "smollm2+secret", "smollm2+support-en"}
    assert ids[NO_BASE] == ["smollm2+support-en", "smollm2+support-fr"]


def test_forbidden_adapter_is_the_same_404_as_a_missing_one(keyed):
    client, _ = keyed
    forbidden = client.post("/v1/chat/completions", json=chat_body("smollm2+secret"),
                            headers=_as(SUPPORT))
    missing = client.post("/v1/chat/completions", json=chat_body("smollm2+secrex"),
                          headers=_as(SUPPORT))
    check_envelope(forbidden, 404, "model", "model_not_found")
    assert forbidden.text == missing.text.replace("secrex", "secret")
    assert forbidden.headers.get("content-length") == missing.headers.get("content-length")
    # also through /v1/models/{id} and for versions the key may not use
    check_envelope(client.get("/v1/models/smollm2+secret", headers=_as(SUPPORT)), 404)
    check_envelope(client.post("/v1/chat/completions", json=chat_body("smollm2+faq"),
                               headers=_as(FAQ_V1)), 404)
    ok = client.post("/v1/chat/completions", json=chat_body("smollm2+faq@1"),
                     headers=_as(FAQ_V1))
    assert ok.status_code == 200 and ok.json()["model"] == "smollm2+faq@1"
    check_envelope(client.post("/v1/chat/completions", json=chat_body(), headers=_as(NO_BASE)),
                   404)
    allowed = client.post("/v1/chat/completions", json=chat_body("smollm2+support-fr"),
                          headers=_as(SUPPORT))
    assert allowed.status_code == 200
    # an adapter of another base: 400 for who may see it, the same 404 for everyone else
    check_envelope(client.post("/v1/chat/completions", json=chat_body("smollm2+foreign"),
                               headers=_as(ADMIN)), 400, "model", "incompatible_adapter")
    hidden = client.post("/v1/chat/completions", json=chat_body("smollm2+foreign"),
                         headers=_as(SUPPORT))
    absent = client.post("/v1/chat/completions", json=chat_body("smollm2+foreigx"),
                         headers=_as(SUPPORT))
    assert hidden.status_code == 404
    assert hidden.text == absent.text.replace("foreigx", "foreign")


def test_admin_routes_need_an_admin_key(keyed):
    client, state = keyed
    check_envelope(client.post("/v1/adapters/support-en/load", headers=_as(SUPPORT)), 403,
                   code="forbidden")
    check_envelope(client.delete("/v1/adapters/support-en", headers=_as(SUPPORT)), 403)
    check_envelope(client.post("/v1/adapters/support-en/load"), 401)
    loaded = client.post("/v1/adapters/support-en/load", headers=_as(ADMIN))
    assert loaded.status_code == 200
    # /health does not name adapters when keys are configured
    health = client.get("/health").json()
    assert "resident_adapters" not in health and health["adapters_resident"] >= 1


def test_open_server_refuses_public_hosts():
    for host in ("0.0.0.0", "192.168.1.10", "::"):
        with pytest.raises(InvalidInput) as info:
            ServerConfig(host=host).check()
        assert "--api-keys" in info.value.message and host in info.value.message
    for host in ("127.0.0.1", "localhost", "::1"):
        ServerConfig(host=host).check()


def test_cli_refuses_public_host_without_keys(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "loradock.cli_serve", "--engine", "fake", "--host", "0.0.0.0"],
        cwd=REPO, env=server_env(tmp_path / "home"), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --host 0.0.0.0 without --api-keys")
