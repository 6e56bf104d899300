"""Push and pull through a loopback STAND-IN for the Hugging Face Hub (see standin_hub.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from hub.store import Store
from tests.hub.standin_hub import StandInHub

TOKEN = "hf_standin_secret_token_1234567890"
CARD = (
    "---\ndraft: false\nlicense: apache-2.0\n"
    "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n# bot\n"
)


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loradock.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture
def hub_env(home, monkeypatch):
    with StandInHub(TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        import os

        yield hub, dict(os.environ)


def with_card(tmp_path, src, text=CARD):
    folder = tmp_path / "with-card"
    shutil.copytree(src, folder)
    (folder / "README.md").write_text(text)
    return folder


def test_push_then_pull_round_trips_identical_files(store, adapter_factory, tmp_path, hub_env):
    hub, env = hub_env
    record = store.register(with_card(tmp_path, adapter_factory(seed=1)), "bot")
    pushed = cli("hub", "push", "bot@1", "--repo", "acme/bot", env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert "tagged v1" in pushed.stdout

    repo = hub.repos["acme/bot"]
    assert repo.tags == {"v1": repo.commits[-1][0]}
    assert sorted(repo.commits[-1][1]) == sorted(record.files)
    import hashlib

    received = {n: hashlib.sha256(d).hexdigest() for n, d in repo.commits[-1][1].items()}
    assert received == record.files

    pulled = cli("hub", "pull", "acme/bot@v1", "--name", "bot-pulled", "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    data = json.loads(pulled.stdout)
    assert data["files"] == record.files
    assert data["source"] == "hf://acme/bot@v1"
    assert Store(store.home).get("bot-pulled").digest == record.digest
    assert ("GET", "/api/models/acme/bot/revision/v1") in hub.requests

    for result in (pushed, pulled):
        assert TOKEN not in result.stdout + result.stderr
    assert hub.auth_failures == 0


def test_push_refuses_draft_or_missing_card(store, adapter_factory, tmp_path, hub_env):
    hub, env = hub_env
    store.register(adapter_factory(seed=1), "nocard")
    result = cli("hub", "push", "nocard", "--repo", "acme/nocard", env=env)
    assert result.returncode == 2
    assert "missing, marked draft" in result.stderr and "--allow-draft" in result.stderr
    assert "acme/nocard" not in hub.repos

    draft_card = CARD.replace("draft: false", "draft: true")
    draft = with_card(tmp_path, adapter_factory(seed=2), draft_card)
    store.register(draft, "drafty")
    assert cli("hub", "push", "drafty", "--repo", "acme/drafty", env=env).returncode == 2
    forced = cli("hub", "push", "drafty", "--repo", "acme/drafty", "--allow-draft", env=env)
    assert forced.returncode == 0, forced.stderr


def test_bad_token_is_a_clean_error_that_does_not_print_the_token(store, adapter_factory,
                                                                  tmp_path, hub_env):
    _, env = hub_env
    store.register(with_card(tmp_path, adapter_factory(seed=1)), "bot")
    env = {**env, "HF_TOKEN": "hf_wrong_token_abcdef"}
    result = cli("hub", "push", "bot", "--repo", "acme/bot", env=env)
    assert result.returncode == 5
    assert result.stderr.startswith("error: Could not push to 'acme/bot' (HTTP 401")
    assert "hf_wrong_token_abcdef" not in result.stdout + result.stderr


def test_pull_of_missing_repo_is_a_clean_error(store, hub_env):
    _, env = hub_env
    result = cli("hub", "pull", "acme/ghost", env=env)
    assert result.returncode == 5
    assert "acme/ghost@main" in result.stderr
