"""``loradock hub add-base NAME ORG/NAME[@REV]`` against the loopback stand-in Hub.

A tiny random Llama (`tests.tiny_models`) is published to the stand-in with huggingface_hub's
own upload; add-base downloads it back through huggingface_hub. Every refusal must cost no
weight download and leave the store without the base (``hub verify`` finds it consistent).
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from hub.bases import describe_base
from hub.store import Store
from tests.hub.standin_hub import StandInHub
from tests.tiny_models import make_tiny_base

TOKEN = "hf_standin_secret_token_add_base_42"
CARD = ("---\nlicense: apache-2.0\n---\n# tiny\n\nThe model was pre-trained on 2T tokens of "
        "web text.\n")
WEIGHTS = "model.safetensors"


class GatedHub(StandInHub):
    """The stand-in with some repos gated for the caller (the Hub's 403 ``GatedRepo``)."""

    def __init__(self, token: str) -> None:
        self.gated: set[str] = set()
        super().__init__(token)

    def _handler(self):  # noqa: ANN202
        base, hub = super()._handler(), self

        class Handler(base):
            def _authorised(self) -> bool:  # the Hub shows a gated repo's info to anyone
                parts = self.path.strip("/").split("/")
                if "Authorization" not in self.headers and "/".join(parts[2:4]) in hub.gated:
                    return True
                return super()._authorised()

            def _repo_info(self, repo_id: str, revision: str) -> None:
                if repo_id not in hub.gated:
                    return super()._repo_info(repo_id, revision)
                found = hub.repos[repo_id].files_at(revision)
                self._json(200, {"id": repo_id, "sha": found[0], "gated": "manual",
                                 "siblings": [{"rfilename": n} for n in sorted(found[1])]})

            def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
                if repo_id in hub.gated:
                    return self._error(403, f"Access to model {repo_id} is restricted.",
                                       "GatedRepo")
                return super()._resolve(repo_id, revision, filename)

        return Handler


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, base_info) -> Path:
    folder = make_tiny_base("llama", tmp_path_factory.mktemp("tiny") / "llama",
                            Path(base_info.path))
    (folder / "README.md").write_text(CARD)
    return folder


@pytest.fixture
def hub(home, base_info, monkeypatch):
    with GatedHub(TOKEN) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield standin


def publish(hub: StandInHub, repo_id: str, folder: Path, tag: str | None = None) -> str:
    """Upload ``folder`` with huggingface_hub (as a model author would); return the commit."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(repo_id, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder).oid
    if tag:
        api.create_tag(repo_id, tag=tag, revision=commit)
    return commit


def cli(*args: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "loradock.cli", "hub", *args],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def assert_nothing_registered(home: Path, name: str) -> None:
    store = Store(home)
    assert name not in {b.name for b in store.bases()}
    assert store.verify().ok
    assert cli("verify").returncode == 0


def test_add_base_from_hub_pins_the_commit_and_records_the_facts(hub, home, tiny_llama,
                                                                 tmp_path):
    folder = tmp_path / "repo"
    import shutil

    shutil.copytree(tiny_llama, folder)
    (folder / "notes.onnx").write_bytes(b"not a base file")
    commit = publish(hub, "acme/tiny-llama", folder, tag="v1")
    publish(hub, "acme/tiny-llama", tiny_llama)  # main moves on; the tag stays on `commit`

    result = cli("add-base", "tiny", "acme/tiny-llama@v1", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["revision"] == commit and info["hf_id"] == "acme/tiny-llama"
    assert f"commit {commit[:12]}" in result.stderr and "GB" in result.stderr  # size first
    assert info["license"] == "apache-2.0" and info["training_tokens"] == 2 * 10**12
    assert info["architecture"] == "LlamaForCausalLM" and info["context_length"] == 512
    local = describe_base("x", tiny_llama)
    assert info["fingerprint"] == local.fingerprint
    assert info["num_parameters"] == local.num_parameters > 0
    assert hub.downloads("acme/tiny-llama", "notes.onnx") == 0
    assert hub.downloads("acme/tiny-llama", WEIGHTS) == 1

    again = cli("add-base", "tiny", "acme/tiny-llama@v1", "--json")  # idempotent, no refetch
    assert again.returncode == 0 and json.loads(again.stdout)["fingerprint"] == local.fingerprint
    assert hub.downloads("acme/tiny-llama", WEIGHTS) == 1
    assert Store(home).base("tiny").revision == commit
    assert Store(home).verify().ok


def test_pickle_only_repo_is_refused_before_any_download(hub, home, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    publish(hub, "acme/pickled", folder)
    line = error_line(cli("add-base", "pickled", "acme/pickled"))
    assert "pickle" in line and "pytorch_model.bin" in line
    assert not [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]
    assert_nothing_registered(home, "pickled")


def test_repo_without_weights_missing_revision_and_missing_repo(hub, home, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    publish(hub, "acme/empty", folder)
    assert "no .safetensors weights" in error_line(cli("add-base", "empty", "acme/empty"))
    line = error_line(cli("add-base", "empty", "acme/empty@no-such-tag"))
    assert "'no-such-tag' does not exist in acme/empty" in line
    assert "No model repo 'acme/nope'" in error_line(cli("add-base", "nope", "acme/nope"))
    assert "neither a local folder" in error_line(cli("add-base", "x", "not-a-folder"))
    assert_nothing_registered(home, "empty")


def test_unknown_architecture_is_refused_before_the_weights_unless_asked(hub, home, tmp_path):
    import torch

    folder = tmp_path / "foo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["FooForCausalLM"], "model_type": "foo",
         "max_position_embeddings": 64}))
    save_file({"model.embed.weight": torch.zeros(4, 8)}, str(folder / WEIGHTS))
    publish(hub, "acme/foo", folder)
    line = error_line(cli("add-base", "foo", "acme/foo"))
    assert "model_type='foo'" in line and "vllm" in line
    assert hub.downloads("acme/foo", WEIGHTS) == 0
    assert_nothing_registered(home, "foo")
    result = cli("add-base", "foo", "acme/foo", "--any-architecture", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["architecture"] == "FooForCausalLM"
    # The PATH form follows the same rule.
    assert "model_type='foo'" in error_line(cli("add-base", "foo-local", str(folder)))
    result = cli("add-base", "foo-local", str(folder), "--any-architecture", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["revision"] == ""


def test_gated_repo_and_size_cap_are_explained(hub, home, tiny_llama, monkeypatch):
    publish(hub, "acme/gated", tiny_llama)
    hub.gated.add("acme/gated")
    line = error_line(cli("add-base", "g", "acme/gated"))
    assert "gated" in line and "HF_TOKEN" in line and TOKEN not in line
    monkeypatch.delenv("HF_TOKEN")
    assert "no HF_TOKEN is set" in error_line(cli("add-base", "g", "acme/gated"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    publish(hub, "acme/big", tiny_llama)
    line = error_line(cli("add-base", "big", "acme/big", "--max-gb", "0.000001"))
    assert "over the" in line and "--no-size-cap" in line
    assert hub.downloads("acme/big", WEIGHTS) == 0
    assert_nothing_registered(home, "g")
    assert_nothing_registered(home, "big")


def test_a_disk_that_fills_leaves_nothing_registered_and_the_rerun_resumes(
        hub, home, tiny_llama, monkeypatch):
    import huggingface_hub.file_download as file_download

    from hub import hf_bases
    from hub.hf_bases import DiskFull, add_base_from_hub

    publish(hub, "acme/tiny", tiny_llama)

    def full_disk(url, temp_file, **kwargs):  # noqa: ANN001, ANN003 - the disk fills mid-file
        temp_file.write(b"\0" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device")

    class NoSpace:
        free = 10

    with monkeypatch.context() as patch:
        patch.setattr(file_download, "http_get", full_disk)
        with pytest.raises(DiskFull, match="filled while downloading acme/tiny"):
            add_base_from_hub(Store(home), "tiny", "acme/tiny", progress=False)
    assert_nothing_registered(home, "tiny")
    with monkeypatch.context() as patch:
        patch.setattr(hf_bases.shutil, "disk_usage", lambda path: NoSpace)
        with pytest.raises(DiskFull, match="GB free"):
            add_base_from_hub(Store(home), "tiny", "acme/tiny", progress=False)
    info = add_base_from_hub(Store(home), "tiny", "acme/tiny", progress=False)
    assert info.fingerprint == describe_base("x", tiny_llama).fingerprint
    assert Store(home).verify().ok
