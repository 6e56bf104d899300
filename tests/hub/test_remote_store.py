"""A store with a remote (``Store(remote="hf:acme")``): lazy, pinned, verified, single-flight pulls.

In process, against the stand-in Hub; the same path served by real server processes is
tests/serve/test_remote_replicas.py.
"""

from __future__ import annotations

import shutil
import threading

import pytest

from hub import remote
from hub.errors import DigestMismatch, NotFound
from hub.store import Store
from tests.hub.standin_hub import StandInHub

TOKEN = "hf_standin_store_token_5555"
CARD = ("---\ndraft: false\nlicense: apache-2.0\n"
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n# bot\n")
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    with StandInHub(TOKEN) as stand_in:
        monkeypatch.setenv("HF_ENDPOINT", stand_in.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield stand_in


@pytest.fixture
def published(store, adapter_factory, tmp_path, hub):
    """bot@1 and bot@2 pushed to acme/bot from a publisher store."""
    for seed in (1, 2):
        folder = tmp_path / f"bot-{seed}"
        shutil.copytree(adapter_factory(seed=seed), folder)
        (folder / "README.md").write_text(CARD)
        record = store.register(folder, "bot")
        remote.push(store, record, "acme/bot")
    return store


def replica(tmp_path, name: str = "replica") -> Store:
    from tests.conftest import TEST_CACHE

    return Store(tmp_path / name, cache=TEST_CACHE / "bases", remote="hf:acme")


def test_a_missing_adapter_is_pulled_once_keeping_the_hub_version(published, tmp_path, hub):
    cache = replica(tmp_path)
    assert cache.list() == []
    second = cache.resolve("smollm2+bot@2").adapter
    assert (second.name, second.version) == ("bot", 2)  # the Hub's v2, not a local "v1"
    assert second.digest == published.get("bot", 2).digest
    assert second.source == f"hf://acme/bot@{hub.repos['acme/bot'].tags['v2']}"
    first = cache.get("bot", 1)
    assert first.digest == published.get("bot", 1).digest
    assert cache.get("bot").version == 2  # the newest held here
    assert hub.downloads("acme/bot", WEIGHTS) == 2
    cache.get("bot", 1)
    assert hub.downloads("acme/bot", WEIGHTS) == 2  # cached
    assert cache.verify().ok


def test_concurrent_first_requests_trigger_one_download(published, tmp_path, hub):
    cache = replica(tmp_path)
    cache.base("smollm2")  # as a server does at start (fingerprinting the base takes seconds)
    results, errors = [], []

    def ask():
        try:
            results.append(cache.resolve("smollm2+bot").adapter.digest)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [published.get("bot", 2).digest] * 20
    assert hub.downloads("acme/bot", WEIGHTS) == 1
    assert [r.version for r in cache.list()] == [2]


def test_unknown_adapters_and_tampered_files_are_refused(published, tmp_path, hub):
    cache = replica(tmp_path)
    with pytest.raises(NotFound) as err:
        cache.get("ghost")
    assert err.value.param == "model"
    with pytest.raises(NotFound):
        cache.get("bot", 7)
    hub.tamper("acme/bot", "v1", WEIGHTS, b"\0" * 64)
    with pytest.raises(DigestMismatch) as err:
        cache.get("bot", 1)
    assert WEIGHTS in err.value.message
    assert cache.list() == []


def test_checks_run_on_the_stores_copy(store, adapter_factory, tmp_path, monkeypatch):
    """Whatever the copy holds is what is checked: a pickle appearing in it is refused."""
    import hub.store as store_module
    from hub.errors import UnsafeWeights

    real_copy = store_module.copy_regular_tree

    def copy_then_tamper(src, dst, **kwargs):
        real_copy(src, dst, **kwargs)
        (dst / "adapter_model.bin").write_bytes(b"\x80\x04pickle")  # swapped in meanwhile

    monkeypatch.setattr(store_module, "copy_regular_tree", copy_then_tamper)
    with pytest.raises(UnsafeWeights, match="adapter_model.bin"):
        store.register(adapter_factory(seed=1), "bot")
    assert store.list() == []
    assert not [p for p in store.adapters_dir.iterdir() if p.name.startswith(".tmp-")]


def test_a_repo_not_pushed_by_loradock_pulls_only_allowed_files(store, adapter_factory, hub):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo("acme/plain")
    source = adapter_factory(seed=3)
    api.upload_folder(repo_id="acme/plain", folder_path=str(source), ignore_patterns=["*.md"])
    api.upload_file(path_or_fileobj=b"\x80\x04", path_in_repo="training_args.bin",
                    repo_id="acme/plain")
    record = remote.pull(store, "acme/plain", name="plain")
    assert set(record.files) == {"adapter_config.json", WEIGHTS}
    assert record.source == f"hf://acme/plain@{hub.repos['acme/plain'].commits[-1][0]}"
    assert not any(path.endswith("training_args.bin") for _, path in hub.requests)
