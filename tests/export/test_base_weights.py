"""Which base weights an export merges into: a QLoRA adapter's 4-bit training values by default.

A random LoRA registered with a manifest that records NF4 training stands in for a trained
adapter; the merged model must then match the adapter on its real 4-bit base (drift top-1 near
100 %), and ``--base-weights original`` must say that it merged into the original weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from export.config import MergeOptions, OllamaOptions, ParityOptions
from export.pipeline import export_merged
from hub.errors import InvalidInput
from hub.manifest import AdapterManifest

PARITY = ParityOptions(prompts=3, max_tokens=12)
QLORA = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
         "compute_dtype": "float32"}


@pytest.fixture
def qlora(store, adapter_factory, tmp_path: Path):
    folder = tmp_path / "qlora"
    shutil.copytree(adapter_factory(seed=9, scale=0.05), folder)
    AdapterManifest(base={"name": "smollm2"}, quantization=dict(QLORA)).write(folder)
    return store.register(folder, "qlora")


def test_qlora_adapter_merges_into_its_training_values_by_default(store, qlora, tmp_path):
    trained = export_merged(store, "qlora", None, tmp_path / "auto",
                            options=MergeOptions(), parity=PARITY)
    assert trained.parity[0].passed
    assert "4-bit (NF4) values" in trained.notes[0]
    assert "4-bit (NF4) values" in (tmp_path / "auto" / "README.md").read_text()
    # The merge is the adapter on its real 4-bit training base, up to fp32 rounding.
    assert trained.drift.top1_agreement >= 0.99, trained.drift

    original = export_merged(store, "qlora", None, tmp_path / "original",
                             options=MergeOptions(base_weights="original"), parity=PARITY)
    assert original.parity[0].passed
    assert original.notes == ["merged into the original unquantised base weights"]
    print(f"drift top-1: training {trained.drift.top1_agreement:.1%}, "
          f"original {original.drift.top1_agreement:.1%}")
    assert original.drift.mean_abs_dlogit > trained.drift.mean_abs_dlogit


def test_training_values_need_a_4bit_record_and_a_merged_build(store, adapter_factory, tmp_path):
    store.register(adapter_factory(seed=10), "plain")  # no manifest: trained where, on what?
    with pytest.raises(InvalidInput, match="records no 4-bit training base"):
        export_merged(store, "plain", None, tmp_path / "x",
                      options=MergeOptions(base_weights="training"), parity=PARITY)
    assert not (tmp_path / "x").exists()
    with pytest.raises(InvalidInput, match="--adapter-only"):
        OllamaOptions(adapter_only=True, base_weights="training").validate()
    assert OllamaOptions(adapter_only=True).validate().base_weights == "auto"
