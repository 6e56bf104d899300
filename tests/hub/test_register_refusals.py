"""Each refusal of `loradock hub register`: exit code != 0 and one line naming problem and fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.factories import set_base_reference


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loradock.cli", *args],
                          capture_output=True, text=True, timeout=300)


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def rewrite_tensors(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file(edit(tensors), path)


def assert_store_empty():
    listed = run_cli("hub", "list", "--json")
    assert listed.returncode == 0
    assert [e for e in json.loads(listed.stdout) if e["kind"] == "adapter"] == []


def test_register_ok_prints_model_and_lists(store, adapter_factory, tmp_path):
    result = run_cli("hub", "register", str(adapter_factory(seed=1)), "--name", "good")
    assert result.returncode == 0, result.stderr
    assert "smollm2+good@1" in result.stdout
    listed = json.loads(run_cli("hub", "list", "--json").stdout)
    entry = next(e for e in listed if e["kind"] == "adapter")
    assert {"name", "version", "base", "path"} <= entry.keys()
    assert (entry["name"], entry["version"], entry["base"]) == ("good", 1, "smollm2")
    assert Path(entry["path"], "adapter_model.safetensors").is_file()


def test_refuses_pickle_weights(store, adapter_factory, tmp_path):
    folder = copy_adapter(adapter_factory(seed=1), tmp_path / "a")
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    result = run_cli("hub", "register", str(folder), "--name", "bad")
    assert result.returncode == 2
    line = one_line_error(result)
    assert "adapter_model.bin" in line and "pickle" in line and "safetensors" in line
    assert_store_empty()


def test_refuses_adapter_of_another_base_by_reference(store, adapter_factory, tmp_path):
    folder = copy_adapter(adapter_factory(seed=1), tmp_path / "a")
    set_base_reference(folder, "meta-llama/Llama-3.1-8B-Instruct")
    result = run_cli("hub", "register", str(folder), "--name", "bad")
    assert result.returncode == 2
    line = one_line_error(result)
    assert "meta-llama/Llama-3.1-8B-Instruct" in line and "--base" in line
    assert_store_empty()


def test_refuses_adapter_of_another_base_by_fingerprint(store, adapter_factory, tmp_path):
    folder = copy_adapter(adapter_factory(seed=1), tmp_path / "a")
    (folder / "loradock.json").write_text(json.dumps(
        {"base": {"name": "other", "fingerprint": "f" * 64}, "method": "sft"}))
    result = run_cli("hub", "register", str(folder), "--name", "bad")
    assert result.returncode == 2
    line = one_line_error(result)
    assert "fingerprint" in line and "ffffffffffff" in line and "add-base" in line


def test_accepts_dead_local_path_reference_when_shapes_fit(store, adapter_factory, tmp_path):
    folder = copy_adapter(adapter_factory(seed=1), tmp_path / "a")
    set_base_reference(folder, "/nonexistent/checkpoints/smollm2")
    result = run_cli("hub", "register", str(folder), "--name", "dead-path")
    assert result.returncode == 0, result.stderr
    config = json.loads((store.get("dead-path").path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_refuses_missing_target_module(store, adapter_factory, tmp_path):
    folder = copy_adapter(adapter_factory(seed=1), tmp_path / "a")
    rewrite_tensors(folder, lambda t: {k.replace("q_proj", "qkv_proj"): v for k, v in t.items()})
    result = run_cli("hub", "register", str(folder), "--name", "bad")
    assert result.returncode == 2
    line = one_line_error(result)
    assert "qkv_proj" in line and "does not have" in line


def test_refuses_wrong_shapes(store, adapter_factory, tmp_path):
    import torch

    folder = copy_adapter(adapter_factory(seed=1), tmp_path / "a")

    def widen(tensors):
        return {k: (torch.zeros(v.shape[0], 1024) if k.endswith("q_proj.lora_A.weight") else v)
                for k, v in tensors.items()}

    rewrite_tensors(folder, widen)
    result = run_cli("hub", "register", str(folder), "--name", "bad")
    assert result.returncode == 2
    line = one_line_error(result)
    assert "lora_A [8, 1024]" in line and "[576, 576]" in line


@pytest.mark.parametrize("name", ["Bad", "../escape", "a/b", "-x", "x" * 65])
def test_refuses_bad_names(store, adapter_factory, name):
    result = run_cli("hub", "register", str(adapter_factory(seed=1)), "--name", name)
    assert result.returncode == 2
    line = one_line_error(result)
    assert "Invalid adapter name" in line and "lower-case" in line
    assert_store_empty()


def test_refuses_folder_without_adapter_config(store, tmp_path):
    folder = tmp_path / "not-an-adapter"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    result = run_cli("hub", "register", str(folder), "--name", "bad")
    assert result.returncode == 2
    line = one_line_error(result)
    assert "not a PEFT adapter" in line and "adapter_config.json" in line


def test_refuses_non_lora_peft_type(store, adapter_factory, tmp_path):
    folder = copy_adapter(adapter_factory(seed=1), tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["peft_type"] = "PREFIX_TUNING"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    result = run_cli("hub", "register", str(folder), "--name", "bad")
    assert result.returncode == 2
    assert "PREFIX_TUNING" in one_line_error(result)


def test_refuses_symlinked_files(store, adapter_factory, tmp_path):
    folder = copy_adapter(adapter_factory(seed=1), tmp_path / "a")
    (tmp_path / "secret").write_text("x")
    (folder / "link.txt").symlink_to(tmp_path / "secret")
    result = run_cli("hub", "register", str(folder), "--name", "bad")
    assert result.returncode == 2
    assert "symlink" in one_line_error(result)
    assert_store_empty()


def test_unknown_base_exit_code(store, adapter_factory):
    result = run_cli("hub", "register", str(adapter_factory(seed=1)), "--name", "x",
                     "--base", "nope")
    assert result.returncode == 3
    assert "Unknown base model 'nope'" in one_line_error(result)


def test_refuses_a_fifo_in_one_line(store, adapter_factory, tmp_path):
    folder = copy_adapter(adapter_factory(seed=1), tmp_path / "a")
    (folder / "data").mkdir()
    os.mkfifo(folder / "data" / "pipe")
    result = run_cli("hub", "register", str(folder), "--name", "bad")
    assert result.returncode == 2
    line = one_line_error(result)
    assert "FIFO 'data/pipe'" in line and "only regular files" in line
    assert_store_empty()


def test_refuses_a_symlinked_folder_in_one_line(store, adapter_factory, tmp_path):
    folder = copy_adapter(adapter_factory(seed=1), tmp_path / "a")
    (tmp_path / "elsewhere").mkdir()
    (folder / "extra").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    result = run_cli("hub", "register", str(folder), "--name", "bad")
    assert result.returncode == 2
    assert "Refusing symlink 'extra'" in one_line_error(result)
    assert_store_empty()


def test_trainer_checkpoints_are_neither_scanned_nor_copied(store, adapter_factory, tmp_path):
    """A Trainer output folder: checkpoint-N holds optimizer.pt (pickle) and may hold links."""
    folder = copy_adapter(adapter_factory(seed=1), tmp_path / "a")
    checkpoint = folder / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    os.mkfifo(checkpoint / "pipe")
    (checkpoint / "latest").symlink_to(folder / "adapter_config.json")
    result = run_cli("hub", "register", str(folder), "--name", "trained", "--json")
    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    assert not any(name.startswith("checkpoint-") for name in files)
    assert not (store.get("trained").path / "checkpoint-2").exists()
