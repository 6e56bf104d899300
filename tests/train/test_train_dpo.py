"""DPO on preference pairs, starting from an SFT adapter registered in the hub (the parent)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hub.errors import InvalidInput
from hub.manifest import AdapterManifest
from tests.train.train_helpers import write_chat_data, write_preference_data, write_recipe
from train.metrics import read_metrics
from train.recipe import load_recipe
from train.run import run


def test_dpo_from_a_parent_adapter(store, adapter_factory, tmp_path):
    from safetensors.torch import load_file

    parent_dir = adapter_factory(seed=3, r=8)  # a real PEFT LoRA (q_proj, v_proj)
    parent = store.register(parent_dir, "sft-parent")
    data = write_preference_data(tmp_path / "pref.jsonl")
    recipe = load_recipe(write_recipe(
        tmp_path / "recipe.yaml", data, tmp_path / "dpo", method="dpo", parent="sft-parent",
        max_steps=2, eval_steps=0, save_steps=0, max_seq_len=64, learning_rate=5e-4))

    result = run(recipe, store=store, progress=False)

    manifest = AdapterManifest.read(result.adapter_dir)
    assert manifest.method == "dpo" and manifest.parent == f"sft-parent@{parent.version}"
    rows = [r for r in read_metrics(result.adapter_dir / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    # The reference is base + parent: at the first step policy == reference, so loss = ln 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert "rewards/margins" in rows[-1]
    # The trained adapter keeps the parent's shape and moved away from it.
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    ours = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    theirs = load_file(str(Path(parent.path) / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()  # only the "default" adapter, not TRL's "ref" copy
    assert any(not (ours[k] == theirs[k]).all() for k in ours)
    assert store.register(result.adapter_dir, "dpo-child").parent == f"sft-parent@{parent.version}"
    # Evaluation compares against the parent adapter, which is the verdict's baseline.
    from train.eval import run_eval

    doc = run_eval(result.adapter_dir, result.base, result.data_dir, max_examples=3,
                   forgetting_texts=1, out_dir=tmp_path / "eval").doc
    assert list(doc["systems"]) == ["base", "parent", "adapter"]
    assert doc["parent"] == f"sft-parent@{parent.version}"
    assert doc["verdict"]["baseline"] == "parent"
    assert "parent adapter" in doc["verdict"]["sentence"]
    systems = doc["systems"]
    assert systems["parent"]["preference_accuracy"] is not None
    assert systems["parent"]["reward_accuracy"] is not None
    # The parent really is a different model from the base: its log-likelihoods differ.
    assert systems["parent"]["mean_margin"] != systems["base"]["mean_margin"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_from_a_parent_are_compared_against_it(store, adapter_factory, tmp_path,
                                                            method):
    parent = store.register(adapter_factory(seed=3, r=8), "sft-parent")
    data = write_preference_data(tmp_path / "pref.jsonl")
    recipe = load_recipe(write_recipe(
        tmp_path / "recipe.yaml", data, tmp_path / method, method=method, parent="sft-parent",
        max_steps=2, eval_steps=0, save_steps=0, max_seq_len=64, learning_rate=5e-4))
    result = run(recipe, store=store, progress=False)
    assert AdapterManifest.read(result.adapter_dir).parent == f"sft-parent@{parent.version}"
    from train.eval import run_eval

    doc = run_eval(result.adapter_dir, result.base, result.data_dir, max_examples=3,
                   forgetting_texts=1, out_dir=tmp_path / "eval").doc
    assert list(doc["systems"]) == ["base", "parent", "adapter"]
    assert doc["verdict"]["baseline"] == "parent" and doc["method"] == method
    assert doc["systems"]["parent"]["mean_margin"] != doc["systems"]["base"]["mean_margin"]


def test_method_and_data_kind_must_agree(store, tmp_path):
    data = write_chat_data(tmp_path / "chat.jsonl", rows=12)
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", data, tmp_path / "out",
                                      method="dpo"))
    with pytest.raises(InvalidInput) as info:
        run(recipe, store=store, progress=False)
    assert info.value.param == "method" and "method: dpo" in info.value.fix
    assert not (tmp_path / "out.work").exists()  # failed before a checkpoint: nothing left
