"""The store: versions, resolution, capabilities, verify, crash safety and concurrency."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub.errors import Incompatible, InvalidInput, NotFound
from hub.store import Store


def register_cmd(folder: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "loradock.cli", "hub", "register", str(folder), "--name", name]


def test_versions_resolve_and_remove(store, adapter_factory):
    a1 = store.register(adapter_factory(seed=1), "bot")
    a2 = store.register(adapter_factory(seed=2), "bot")
    assert (a1.version, a2.version) == (1, 2)
    assert store.resolve("smollm2+bot").adapter.version == 2
    assert store.resolve("smollm2+bot@1").adapter.digest == a1.digest
    assert store.resolve("smollm2").adapter is None
    store.remove("bot", 2)
    assert store.resolve("smollm2+bot").adapter.version == 1
    assert store.register(adapter_factory(seed=3), "bot").version == 3  # never reused
    with pytest.raises(NotFound):
        store.resolve("smollm2+bot@2")
    with pytest.raises(NotFound):
        store.resolve("smollm2+ghost")
    with pytest.raises(NotFound):
        store.resolve("nobase+bot")


def test_resolve_adapter_takes_a_bare_or_a_based_reference(store, adapter_factory, base_info):
    a1 = store.register(adapter_factory(seed=1), "bot")
    store.register(adapter_factory(seed=2), "bot")
    for text in ("bot@1", "smollm2+bot@1"):
        record, base = store.resolve_adapter(text)
        assert (record.digest, base.name) == (a1.digest, base_info.name)
    assert store.resolve_adapter("bot")[0].version == 2
    with pytest.raises(InvalidInput, match="names a base, not an adapter"):
        store.resolve_adapter("smollm2")
    with pytest.raises(NotFound):
        store.resolve_adapter("ghost")


def test_registered_files_are_immutable_copies(store, adapter_factory):
    record = store.register(adapter_factory(seed=1), "bot")
    weights = record.path / "adapter_model.safetensors"
    assert not os.access(weights, os.W_OK) or os.geteuid() == 0
    assert oct(weights.stat().st_mode & 0o777) == "0o444"
    assert set(record.files) >= {"adapter_model.safetensors", "adapter_config.json"}


def test_capabilities_record_what_engines_need(store, adapter_factory):
    plain = store.register(adapter_factory(seed=1, r=4), "plain").capabilities
    assert (plain.rank, plain.alpha, plain.target_modules) == (4, 16.0, ["q_proj", "v_proj"])
    assert not plain.use_dora and not plain.modules_to_save and not plain.targets_embeddings
    assert plain.engine_problems("vllm") == []
    assert "rank 4 is over" in plain.engine_problems("vllm", max_rank=2)[0]

    dora = store.register(adapter_factory(seed=1, use_dora=True), "dora").capabilities
    assert dora.use_dora and "DoRA" in " ".join(dora.engine_problems("vllm"))

    saved = store.register(
        adapter_factory(seed=1, modules_to_save=["lm_head"]), "saved").capabilities
    assert saved.modules_to_save == ["lm_head"]
    assert saved.engine_problems("llamacpp")

    embed = store.register(
        adapter_factory(seed=1, targets=("q_proj", "embed_tokens")), "embed").capabilities
    assert embed.targets_embeddings


def test_adapter_of_another_base_is_refused_at_resolve(store, adapter_factory, base_info):
    store.add_base("copy", Path(base_info.path))  # same weights under another name
    store.register(adapter_factory(seed=1), "bot")
    with pytest.raises(Incompatible) as err:
        store.resolve("copy+bot")
    assert "smollm2+bot" in str(err.value)


def test_verify_names_corrupt_files(store, adapter_factory):
    record = store.register(adapter_factory(seed=1), "bot")
    assert store.verify().ok
    config = record.path / "adapter_config.json"
    config.chmod(0o644)
    config.write_text(config.read_text().replace("16", "32"))
    report = store.verify()
    assert report.corrupt == {"bot@1": ["adapter_config.json"]}
    result = subprocess.run([sys.executable, "-m", "loradock.cli", "hub", "verify"],
                            capture_output=True, text=True)
    assert result.returncode == 4
    assert "CORRUPT  bot@1: adapter_config.json" in result.stdout


def _wait_for_tmp(adapters_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.startswith(".tmp-") for p in adapters_dir.iterdir()):
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("extra_delay", [0.0, 0.1, 0.3])
def test_register_killed_mid_copy_leaves_store_consistent(store, adapter_factory, tmp_path,
                                                          extra_delay):
    """kill -9 during the copy/hash: no half version is visible and verify passes."""
    folder = tmp_path / "big"
    shutil.copytree(adapter_factory(seed=1), folder)
    with open(folder / "extra.safetensors.part", "wb") as fh:  # copy + hash take ~1 s
        fh.truncate(256 << 20)
    store.register(adapter_factory(seed=2), "bot")  # v1 exists before the crash
    proc = subprocess.Popen(register_cmd(folder, "bot"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert _wait_for_tmp(store.adapters_dir, proc), "registration never started copying"
    time.sleep(extra_delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the register finished before it was killed"

    fresh = Store(store.home)
    assert [(r.name, r.version) for r in fresh.list()] == [("bot", 1)]
    assert fresh.resolve("smollm2+bot").adapter.version == 1
    report = fresh.verify()
    assert report.ok and report.checked == 1
    assert not any(p.name.startswith(".tmp-") for p in fresh.adapters_dir.iterdir())
    assert fresh.register(adapter_factory(seed=3), "bot").version == 2


def test_unindexed_folder_from_a_crash_after_rename_is_invisible_and_cleaned(store,
                                                                             adapter_factory):
    shutil.copytree(adapter_factory(seed=1), store.adapters_dir / "bot" / "v1")
    assert store.list() == []
    assert store.register(adapter_factory(seed=2), "bot").version == 1
    assert store.verify().ok


def test_two_processes_registering_the_same_name_get_distinct_versions(store, adapter_factory):
    folder = adapter_factory(seed=1)
    procs = [subprocess.Popen(register_cmd(folder, "bot") + ["--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outputs]
    versions = sorted(json.loads(out)["version"] for out, _ in outputs)
    assert versions == [1, 2, 3]
    assert store.verify().ok


REGISTER_LOOP = """
import sys
from pathlib import Path
from hub.store import Store
store = Store(Path(sys.argv[1]))
for _ in range(int(sys.argv[3])):
    store.register(Path(sys.argv[2]), "racer")
"""


def test_verify_racing_20_registrations_loses_nothing(store, adapter_factory, tmp_path):
    """verify cleans unindexed folders; a version committed while it hashes is not one."""
    slow = tmp_path / "slow"
    shutil.copytree(adapter_factory(seed=1), slow)
    with open(slow / "padding.safetensors.part", "wb") as fh:  # hashing it takes a while
        fh.write(os.urandom(48 << 20))
    store.register(slow, "slow")
    proc = subprocess.Popen([sys.executable, "-c", REGISTER_LOOP, str(store.home),
                             str(adapter_factory(seed=2)), "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rounds, removed = 0, []
    while proc.poll() is None or rounds == 0:
        report = store.verify()
        assert report.ok, report.corrupt
        removed += report.leftovers_removed
        rounds += 1
    assert proc.returncode == 0, proc.stderr.read()
    assert not [p for p in removed if "/racer/v" in p], removed
    records = store.list("racer")
    assert [r.version for r in records] == list(range(1, 21))
    for record in records:
        store.check(record)  # every file of every version is still there, unchanged
    assert rounds >= 2, "verify never overlapped the registrations"
    assert store.verify().ok
