"""`loradock eval`: a registered (read-only) adapter is evaluated into --out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loradock.cli import main


def _run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_eval_registered_adapter_writes_to_out(
    adapter_factory, store, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "lora"
    shutil.copytree(adapter_factory(seed=3), folder)
    record = store.register(folder, "greeter")
    before = sorted(p.name for p in record.path.iterdir())
    data = tmp_path / "prepared"
    data.mkdir()
    row = {"messages": [{"role": "user", "content": "Say hello."},
                        {"role": "assistant", "content": "Hello there!"}], "line": 1}
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "eval-out"
    code = _run([
        "eval", "greeter@1", "--data", str(data), "--out", str(out), "--max-new-tokens", "2",
        "--few-shot", "1", "--device", "cpu", "--forgetting-texts", "3",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "eval.json").read_text())
    assert f"smollm2+greeter@1: {doc['verdict']['sentence']}" in printed
    assert doc["primary_metric"] == "rouge_l" and doc["forgetting"]["texts"] == 3
    assert (out / "eval_report.md").is_file()
    assert sorted(p.name for p in record.path.iterdir()) == before  # store folder untouched


def test_eval_needs_a_target_and_data(store, capsys: pytest.CaptureFixture) -> None:
    assert _run(["eval", "--data", "x"]) == 2
    assert _run(["eval", "greeter"]) == 2
    assert "--data is required" in capsys.readouterr().err


def test_eval_device_auto_uses_the_device_training_recorded(
    adapter_factory, store, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "lora"
    shutil.copytree(adapter_factory(seed=3), folder)
    data = tmp_path / "prepared"
    data.mkdir()
    row = {"messages": [{"role": "user", "content": "Say hello."},
                        {"role": "assistant", "content": "Hello there!"}], "line": 1}
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    code = _run(["eval", "--dir", str(folder), "--data", str(data), "--max-new-tokens", "2",
                 "--few-shot", "1", "--forgetting-texts", "3"])
    assert code == 0
    saved = json.loads((folder / "eval.json").read_text())
    assert (saved["device"], saved["device_note"]) == ("cpu", "as in training")
