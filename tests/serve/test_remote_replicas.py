"""Stateless replicas: two real ``loradock serve --remote hf:acme`` processes sharing no volume.

An adapter pushed to the (stand-in) Hub after both servers started is served by both: the first
requests pull it lazily, pinned to its ``v1`` commit and digest-checked, once per replica even
with 32 concurrent first requests on each; later requests use the cached copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from hub.store import Store
from tests.hub.standin_hub import StandInHub
from tests.serve.helpers import REPO, ServerProcess, free_port, server_env

TOKEN = "hf_standin_replica_token_0987654321"
CARD = ("---\ndraft: false\nlicense: apache-2.0\n"
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n# bot\n")
WEIGHTS = "adapter_model.safetensors"
CONCURRENT = 32


def launch(home: Path, hub: StandInHub) -> ServerProcess:
    """Start a peft-engine replica with ``--remote hf:acme`` (not waiting for it)."""
    port = free_port()
    home.mkdir(parents=True)
    env = server_env(home)
    env.update({"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_XET": "1"})
    log_path = home.parent / f"{home.name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loradock.cli_serve", "--engine", "peft", "--base-dtype",
             "fp32", "--host", "127.0.0.1", "--port", str(port), "--remote", "hf:acme",
             "--max-running", "16", "--threads", "1"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return ServerProcess(proc, f"http://127.0.0.1:{port}", home, log_path)


def wait_healthy(server: ServerProcess, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.alive(), server.log_text()[-4000:]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return
        time.sleep(0.25)
    raise AssertionError(f"not healthy:\n{server.log_text()[-4000:]}")


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    with StandInHub(TOKEN) as stand_in:
        monkeypatch.setenv("HF_ENDPOINT", stand_in.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield stand_in


def test_two_replicas_pull_an_adapter_pushed_after_they_started_once_each(
        hub, adapter_factory, base_info, tmp_path):
    from hub import remote

    replicas = [launch(tmp_path / f"replica-{i}", hub) for i in range(2)]
    try:
        started = time.monotonic()
        for server in replicas:
            wait_healthy(server)
        print(f"replicas healthy after {time.monotonic() - started:.1f} s")
        from tests.conftest import TEST_CACHE

        publisher = Store(tmp_path / "publisher", cache=TEST_CACHE / "bases")
        folder = tmp_path / "bot"
        shutil.copytree(adapter_factory(seed=11), folder)
        (folder / "README.md").write_text(CARD)
        record = publisher.register(folder, "bot")
        pushed = remote.push(publisher, record, "acme/bot")
        assert hub.downloads("acme/bot", WEIGHTS) == 0

        def ask(server: ServerProcess) -> str:
            response = server.client().chat.completions.create(
                model="smollm2+bot@1", max_tokens=2, temperature=0,
                messages=[{"role": "user", "content": "Say hi."}])
            return response.model

        jobs = [replicas[i % 2] for i in range(2 * CONCURRENT)]
        started = time.monotonic()
        with ThreadPoolExecutor(len(jobs)) as pool:
            models = list(pool.map(ask, jobs))
        print(f"{len(jobs)} first requests answered in {time.monotonic() - started:.1f} s")
        assert models == ["smollm2+bot@1"] * len(jobs)
        assert hub.downloads("acme/bot", WEIGHTS) == 2  # one pull per replica

        for server in replicas:
            held = Store(server.home).get("bot", 1)
            assert held.digest == record.digest
            assert held.source == f"hf://acme/bot@{pushed.commit}"
            assert ask(server) == "smollm2+bot@1"
            missing = server.http().post("/v1/chat/completions", json={
                "model": "smollm2+ghost", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]})
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "model_not_found"
        assert hub.downloads("acme/bot", WEIGHTS) == 2  # later requests use the cached copy
        assert not any(TOKEN in server.log_text() for server in replicas)
    finally:
        for server in replicas:
            server.stop()
    assert os.path.commonpath([replicas[0].home, replicas[1].home]) == str(tmp_path)
