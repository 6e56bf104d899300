"""The ingress's catalogue: model strings to content ids from the Hub's tags and digests files.

No Ray here: `serve.ray.catalog.RemoteCatalog` against the stand-in Hub, and a check that the
default install never imports ray.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from hub.errors import InvalidInput, NotFound
from hub.store import Store
from serve.ray.catalog import RemoteCatalog, content_id, parse_content_id
from tests.hub.standin_hub import StandInHub
from tests.ray.conftest import CARD, TOKEN, WEIGHTS
from tests.serve.helpers import REPO


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    with StandInHub(TOKEN) as stand_in:
        monkeypatch.setenv("HF_ENDPOINT", stand_in.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield stand_in


def test_the_catalog_resolves_versions_to_content_ids_without_downloading_weights(
        hub, adapter_factory, base_info, tmp_path):
    from hub import remote
    from tests.conftest import TEST_CACHE

    publisher = Store(tmp_path / "publisher", cache=TEST_CACHE / "bases")
    records = []
    for seed in (21, 22):
        folder = tmp_path / f"bot-{seed}"
        shutil.copytree(adapter_factory(seed=seed), folder)
        (folder / "README.md").write_text(CARD)
        records.append(publisher.register(folder, "bot"))
    remote.push(publisher, records[0], "acme/bot")
    catalog = RemoteCatalog(tmp_path / "ingress", "hf:acme", cache=TEST_CACHE / "bases",
                            tags_ttl_s=60)
    newest = catalog.resolve("smollm2+bot").adapter
    assert (newest.version, newest.digest) == (1, records[0].digest)
    assert content_id(newest) == f"bot@1:{records[0].digest}"
    assert parse_content_id(content_id(newest)) == ("bot", 1, records[0].digest)
    remote.push(publisher, records[1], "acme/bot")
    assert catalog.get("bot").version == 1  # the tag list is reused for tags_ttl_s
    catalog.tags_ttl_s = 0.2
    time.sleep(0.3)
    assert catalog.get("bot").digest == records[1].digest
    assert catalog.get("bot", 1).digest == records[0].digest
    assert [r.version for r in catalog.list()] == [1, 2]
    with pytest.raises(NotFound, match="bot@3"):
        catalog.get("bot", 3)
    with pytest.raises(NotFound, match="ghost"):
        catalog.get("ghost")
    assert hub.downloads("acme/bot", WEIGHTS) == 0  # only the replicas download weights


@pytest.mark.parametrize("bad", ["bot", "bot@1", "bot@1:abc", "../x@1:" + "0" * 64, ""])
def test_a_malformed_content_id_is_refused(bad):
    with pytest.raises(InvalidInput, match="content id"):
        parse_content_id(bad)


def test_the_default_install_never_imports_ray():
    code = ("import sys, loradock.cli, loradock.cli_serve, serve.server, serve.http.app, "
            "serve.ray.app, serve.ray.catalog; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
