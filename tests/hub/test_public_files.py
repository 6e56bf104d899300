"""Nothing `hub push` uploads names this machine's home, temp or checkout folders.

A real run, the way users make adapters: ``loradock train`` (data and output given as absolute
paths in a temp folder, the base converted under the checkout) writes the manifest, eval.json,
the eval report and the card, registers the adapter, and ``loradock hub push`` uploads it to the
stand-in Hub. Every byte of every uploaded file is then searched for those folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import REPO
from tests.hub.standin_hub import StandInHub
from tests.train.train_helpers import write_chat_data, write_recipe

TOKEN = "hf_standin_public_files_token_42"


def test_every_pushed_file_is_free_of_local_paths(store, tmp_path):
    data = write_chat_data(tmp_path / "chats.jsonl", rows=24)
    recipe = write_recipe(tmp_path / "recipe.yaml", data, tmp_path / "runs" / "bot",
                          max_steps=1, max_eval_examples=2, max_new_tokens=4, few_shot_k=1)
    with StandInHub(TOKEN) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN,
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
        trained = subprocess.run(
            [sys.executable, "-m", "loradock.cli", "train", str(recipe), "--register", "bot",
             "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert trained.returncode == 0, trained.stderr[-3000:]
        pushed = subprocess.run(
            [sys.executable, "-m", "loradock.cli", "hub", "push", "bot", "--repo", "acme/bot",
             "--allow-draft"], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=300)
        assert pushed.returncode == 0, pushed.stderr
        uploaded = hub.repos["acme/bot"].files_at("v1")[1]

    assert {"loradock.json", "eval.json", "eval_report.md", "README.md",
            "data/data_report.json", "adapter_config.json"} <= set(uploaded)
    needles = {
        "home": str(Path.home()).rstrip("/") + "/",
        "temp": tempfile.gettempdir().rstrip("/") + "/",
        "this test's folder": str(tmp_path),
        "checkout": str(REPO) + "/",
        "store": str(store.home),
    }
    leaks = [f"{name}: {kind}" for name, content in sorted(uploaded.items())
             for kind, needle in needles.items() if needle.encode() in content]
    assert leaks == []
    card = uploaded["README.md"].decode()
    assert "chats.jsonl" in card  # the dataset is still named, by its file name and sha256
