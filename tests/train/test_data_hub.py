"""``data: hf://datasets/ORG/NAME[@REV][/FILE]`` via huggingface_hub, against a local stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hub.errors import InvalidInput, NotFound
from tests.train.hub_datasets_standin import StandInDatasets
from train.data import prepare_dataset
from train.data.hub_source import fetch_hub_dataset, parse_hub_dataset
from train.recipe import build_recipe


def _jsonl(n: int, word: str) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"Say {word} number {i}."},
                          {"role": "assistant", "content": f"{word.title()} {i}."}]}
            for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import huggingface_hub.constants as constants

    with StandInDatasets() as stand_in:
        monkeypatch.setenv("HF_ENDPOINT", stand_in.endpoint)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        yield stand_in


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("hf://datasets/org/name", ("org/name", None, None)),
        ("hf://datasets/org/name@v1.0", ("org/name", "v1.0", None)),
        ("hf://datasets/org/my-data@abc123/data/train.jsonl",
         ("org/my-data", "abc123", "data/train.jsonl")),
        ("hf://datasets/org/name/train.parquet", ("org/name", None, "train.parquet")),
    ],
)
def test_parse(data: str, expected: tuple) -> None:
    assert parse_hub_dataset(data) == expected


@pytest.mark.parametrize(
    "data",
    ["hf://datasets/name", "hf://datasets/org/name@", "hf://datasets/org/name/../x.jsonl",
     "hf://datasets/org/name/readme.md", "hf://models/org/name", "hf://datasets/-x/y"],
)
def test_parse_refuses(data: str) -> None:
    with pytest.raises(InvalidInput, match="hf://datasets/ORG/NAME"):
        parse_hub_dataset(data)


def test_fetch_pins_the_commit_and_prepare_records_it(hub: StandInDatasets, tmp_path: Path):
    first = hub.add("acme/greetings", {"README.md": b"# hi", "data/train.jsonl": _jsonl(6, "hi")},
                    tag="v1")
    second = hub.add("acme/greetings", {"data/train.jsonl": _jsonl(9, "yo")})
    local, origin = fetch_hub_dataset("hf://datasets/acme/greetings")
    assert origin == {"source": "hf://datasets/acme/greetings", "repo": "acme/greetings",
                      "revision": "main", "sha": second, "file": "data/train.jsonl"}
    assert local.read_bytes() == _jsonl(9, "yo")
    local, origin = fetch_hub_dataset("hf://datasets/acme/greetings@v1")
    assert (origin["sha"], origin["revision"]) == (first, "v1")
    assert any(path.endswith(f"/resolve/{first}/data/train.jsonl") for _, path in hub.requests)
    report = prepare_dataset(local, tmp_path / "out", origin=origin)
    saved = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert saved["origin"]["sha"] == first and report.rows_kept == 6
    assert report.source == f"hf://datasets/acme/greetings@{first}/data/train.jsonl"


def test_fetch_errors_name_the_problem(hub: StandInDatasets) -> None:
    hub.add("acme/two", {"train.jsonl": _jsonl(2, "a"), "extra.csv": b"prompt,completion\n"})
    hub.add("acme/many", {"a.jsonl": _jsonl(2, "a"), "b.jsonl": _jsonl(2, "b")})
    local, origin = fetch_hub_dataset("hf://datasets/acme/two")  # the one with "train"
    assert origin["file"] == "train.jsonl"
    with pytest.raises(InvalidInput, match="2 data files") as info:
        fetch_hub_dataset("hf://datasets/acme/many")
    assert "hf://datasets/acme/many/a.jsonl" in info.value.fix
    with pytest.raises(NotFound, match="acme/nope"):
        fetch_hub_dataset("hf://datasets/acme/nope")
    with pytest.raises(NotFound, match="RevisionNotFound"):
        fetch_hub_dataset("hf://datasets/acme/two@v9")
    with pytest.raises(NotFound, match="missing.jsonl"):
        fetch_hub_dataset("hf://datasets/acme/two/missing.jsonl")


def test_offline_mode_says_how_to_go_online(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    hub.add("acme/greetings", {"train.jsonl": _jsonl(3, "hi")})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NotFound) as info:
        fetch_hub_dataset("hf://datasets/acme/greetings")
    assert "HF_HUB_OFFLINE=0" in info.value.fix


def test_recipe_accepts_a_hub_dataset(tmp_path: Path) -> None:
    recipe = build_recipe({"data": "hf://datasets/acme/greetings@v1", "output": "o"},
                          base_dir=tmp_path)
    assert recipe.data == "hf://datasets/acme/greetings@v1"  # not made a local path
    with pytest.raises(InvalidInput, match="data: .*not a Hub dataset reference"):
        build_recipe({"data": "hf://datasets/acme", "output": "o"}, base_dir=tmp_path)
