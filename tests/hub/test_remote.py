"""Push and pull through a loopback STAND-IN for the Hugging Face Hub (see standin_hub.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from hub.remote import DIGESTS_FILE
from hub.store import Store
from tests.hub.standin_hub import StandInHub

TOKEN = "hf_standin_secret_token_1234567890"
CARD = (
    "---\ndraft: false\nlicense: apache-2.0\n"
    "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n# bot\n"
)
WEIGHTS = "adapter_model.safetensors"


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loradock.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def hub_env(home, monkeypatch):
    with StandInHub(TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield hub, dict(os.environ)


def with_card(tmp_path, src, text=CARD, name="with-card"):
    folder = tmp_path / name
    shutil.copytree(src, folder)
    (folder / "README.md").write_text(text)
    return folder


def files_at(hub: StandInHub, repo_id: str, revision: str) -> dict[str, str]:
    found = hub.repos[repo_id].files_at(revision)
    assert found is not None
    return {n: hashlib.sha256(d).hexdigest() for n, d in found[1].items()
            if n not in (".gitattributes", DIGESTS_FILE)}


def test_push_then_pull_round_trips_identical_files(store, adapter_factory, tmp_path, hub_env):
    hub, env = hub_env
    record = store.register(with_card(tmp_path, adapter_factory(seed=1)), "bot")
    pushed = cli("hub", "push", "bot@1", "--repo", "acme/bot", env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert "tagged v1" in pushed.stdout

    repo = hub.repos["acme/bot"]
    head = repo.commits[-1][0]
    assert repo.tags == {"v1": head}
    assert files_at(hub, "acme/bot", "v1") == record.files
    digests = json.loads(repo.commits[-1][1][DIGESTS_FILE])
    assert digests["files"] == record.files and digests["digest"] == record.digest
    # The weights went through the LFS protocol, as the real Hub takes .safetensors.
    assert record.files[WEIGHTS] in hub.lfs_objects
    assert ("PUT", f"/lfs-upload/{record.files[WEIGHTS]}") in hub.requests
    assert ("POST", "/acme/bot.git/info/lfs/objects/batch") in hub.requests

    pulled = cli("hub", "pull", "acme/bot", "--name", "bot-pulled", "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    data = json.loads(pulled.stdout)
    assert data["files"] == record.files
    assert data["source"] == f"hf://acme/bot@{head}"  # the commit, not the tag
    assert Store(store.home).get("bot-pulled").digest == record.digest
    assert hub.downloads("acme/bot", WEIGHTS) == 1

    for result in (pushed, pulled):
        assert TOKEN not in result.stdout + result.stderr
    assert hub.auth_failures == 0


def test_push_deletes_files_an_earlier_push_left(store, adapter_factory, tmp_path, hub_env):
    hub, env = hub_env
    first = with_card(tmp_path, adapter_factory(seed=1), name="first")
    (first / "notes.md").write_text("only in v1\n")
    store.register(first, "bot")
    store.register(with_card(tmp_path, adapter_factory(seed=2), name="second"), "bot")
    assert cli("hub", "push", "bot@1", "--repo", "acme/bot", env=env).returncode == 0
    assert cli("hub", "push", "bot@2", "--repo", "acme/bot", env=env).returncode == 0
    assert "notes.md" in files_at(hub, "acme/bot", "v1")
    assert files_at(hub, "acme/bot", "v2") == store.get("bot", 2).files  # notes.md deleted
    assert ".gitattributes" in hub.repos["acme/bot"].commits[-1][1]


def test_double_push_of_a_version_from_two_clones_is_refused_or_moved(
        store, adapter_factory, tmp_path, hub_env):
    hub, env = hub_env
    mine = store.register(with_card(tmp_path, adapter_factory(seed=1), name="a"), "bot")
    other_home = tmp_path / "clone-b"
    other = Store(other_home).register(with_card(tmp_path, adapter_factory(seed=2), name="b"),
                                       "bot")
    env_b = {**env, "LORADOCK_HOME": str(other_home)}
    assert cli("hub", "push", "bot@1", "--repo", "acme/bot", env=env).returncode == 0
    tagged = hub.repos["acme/bot"].tags["v1"]

    refused = cli("hub", "push", "bot@1", "--repo", "acme/bot", env=env_b)
    assert refused.returncode == 2
    line = one_line_error(refused)
    assert "Tag v1 of acme/bot already points at commit" in line and "--force-tag" in line
    assert hub.repos["acme/bot"].tags["v1"] == tagged
    assert files_at(hub, "acme/bot", "v1") == mine.files  # v1 still names the first content

    again = cli("hub", "push", "bot@1", "--repo", "acme/bot", env=env)
    assert again.returncode == 0 and "already holds" in again.stdout

    moved = cli("hub", "push", "bot@1", "--repo", "acme/bot", "--force-tag", env=env_b)
    assert moved.returncode == 0, moved.stderr
    assert f"moved tag v1 from {tagged[:12]}" in moved.stdout
    assert files_at(hub, "acme/bot", "v1") == other.files
    assert hub.repos["acme/bot"].tags["v1"] != tagged


def test_concurrent_pushes_of_a_version_never_mislabel_it(store, adapter_factory, tmp_path,
                                                          hub_env):
    hub, env = hub_env
    homes, records = [], []
    for i in range(2):
        home = tmp_path / f"clone-{i}"
        folder = with_card(tmp_path, adapter_factory(seed=3 + i), name=f"c{i}")
        records.append(Store(home).register(folder, "bot"))
        homes.append(home)
    procs = [subprocess.Popen([sys.executable, "-m", "loradock.cli", "hub", "push", "bot@1",
                               "--repo", "acme/race"], env={**env, "LORADOCK_HOME": str(h)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for h in homes]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes[0] == 0 and codes[1] in (0, 2), results
    tagged = files_at(hub, "acme/race", "v1")
    assert tagged in ([r.files for r in records])  # the tag names one clone's content, whole
    winner = next(i for i, r in enumerate(records) if r.files == tagged)
    assert results[winner][2] == 0
    digests = json.loads(hub.repos["acme/race"].files_at("v1")[1][DIGESTS_FILE])
    assert digests["files"] == tagged


def test_private_push_refuses_an_existing_public_repo(store, adapter_factory, tmp_path, hub_env):
    hub, env = hub_env
    store.register(with_card(tmp_path, adapter_factory(seed=1)), "bot")
    assert cli("hub", "push", "bot", "--repo", "acme/public", env=env).returncode == 0
    commits = len(hub.repos["acme/public"].commits)
    result = cli("hub", "push", "bot", "--repo", "acme/public", "--private", env=env)
    assert result.returncode == 2
    assert "acme/public already exists and is public" in one_line_error(result)
    assert len(hub.repos["acme/public"].commits) == commits
    assert cli("hub", "push", "bot", "--repo", "acme/secret", "--private", env=env
               ).returncode == 0
    assert hub.repos["acme/secret"].private


@pytest.mark.parametrize("filename", [WEIGHTS, "adapter_config.json"])
def test_pull_refuses_a_file_tampered_on_the_hub(store, adapter_factory, tmp_path, hub_env,
                                                 filename):
    hub, env = hub_env
    store.register(with_card(tmp_path, adapter_factory(seed=1)), "bot")
    assert cli("hub", "push", "bot", "--repo", "acme/bot", env=env).returncode == 0
    original = hub.repos["acme/bot"].files_at("v1")[1][filename]
    tampered = original[:-2] + b" \n" if filename.endswith(".json") else (
        original[:-4] + bytes(4))
    hub.tamper("acme/bot", "v1", filename, tampered)
    result = cli("hub", "pull", "acme/bot@v1", "--name", "bot-pulled", env=env)
    assert result.returncode == 4
    line = one_line_error(result)
    assert "do not match their published digests" in line and filename in line
    assert [r.name for r in Store(store.home).list()] == ["bot"]


def test_pull_fetches_only_the_listed_files_and_refuses_pickles(store, adapter_factory,
                                                                tmp_path, hub_env):
    from huggingface_hub import HfApi

    hub, env = hub_env
    record = store.register(with_card(tmp_path, adapter_factory(seed=1)), "bot")
    assert cli("hub", "push", "bot", "--repo", "acme/bot", env=env).returncode == 0
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.upload_file(path_or_fileobj=b"\x80\x04pickle", path_in_repo="optimizer.pt",
                    repo_id="acme/bot")
    result = cli("hub", "pull", "acme/bot@main", "--name", "bot-main", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files"] == record.files
    assert not any(path.endswith("/optimizer.pt") for _, path in hub.requests)

    digests = json.loads(hub.repos["acme/bot"].files_at("main")[1][DIGESTS_FILE])
    digests["files"]["optimizer.pt"] = hashlib.sha256(b"\x80\x04pickle").hexdigest()
    api.upload_file(path_or_fileobj=json.dumps(digests).encode(), path_in_repo=DIGESTS_FILE,
                    repo_id="acme/bot")
    refused = cli("hub", "pull", "acme/bot@main", "--name", "bot-pickle", env=env)
    assert refused.returncode == 2
    assert "Refusing pickle weights 'optimizer.pt'" in one_line_error(refused)
    assert not any(path.endswith("/optimizer.pt") for _, path in hub.requests)


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

    # modelcards' full rule: `draft: false` with items still to complete is a draft too.
    listed = CARD + "\n## To complete before publishing\n\n- card.provider\n"
    store.register(with_card(tmp_path, adapter_factory(seed=3), listed, name="listed"), "listed")
    result = cli("hub", "push", "listed", "--repo", "acme/listed", env=env)
    assert result.returncode == 2 and "to complete: card.provider" in result.stderr


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
    assert result.returncode == 3
    assert "acme/ghost@newest version is not on the Hub" in one_line_error(result)
