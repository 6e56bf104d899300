"""QLoRA SFT on the real base: 4-bit layers under the LoRA, finite loss, only LoRA weights change,
the adapter folder is complete and loads with PEFT; a run killed after a checkpoint resumes with
``loradock train --resume`` and ends where an uninterrupted run on the same seed ends.

One uninterrupted run (3 steps, checkpoints at 2) is shared by the tests of this module: it is
both the subject of the QLoRA checks and the reference the resumed run is compared with.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import TrainerCallback

from hub.manifest import AdapterManifest
from hub.store import Store
from tests.train.train_helpers import write_chat_data, write_recipe
from train.metrics import read_metrics
from train.recipe import load_recipe
from train.run import run, work_dir_for

REPO = Path(__file__).resolve().parents[2]
# Same tolerance for loss and weights: the runs differ only by the process boundary (same seed,
# same thread count), so they should agree to float32 rounding; 1e-4 relative leaves margin.
RTOL = 1e-4


class Probe(TrainerCallback):
    """Records what the model looks like before and after training."""

    def __init__(self) -> None:
        self.before: dict = {}
        self.after: dict = {}
        self.info: dict = {}

    @staticmethod
    def _watched(model) -> dict:
        import torch

        out = {}
        for name, param in model.named_parameters():
            frozen_pick = (
                ("layers.0.self_attn.q_proj.base_layer.weight" in name)
                or ("layers.29.mlp.down_proj.base_layer.weight" in name)
                or name.endswith("embed_tokens.weight")
                or name.endswith("layers.3.input_layernorm.weight")
            )
            if "lora_" in name or frozen_pick:
                out[name] = (param.detach().clone(), param.requires_grad, str(param.dtype))
        out["_absmax"] = torch.cat([
            m.base_layer.weight.quant_state.absmax.flatten().float()
            for _, m in list(_lora_layers(model))[:4]
        ]).clone()
        return out

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import bitsandbytes as bnb

        layers = list(_lora_layers(model))
        self.info["lora_layers"] = len(layers)
        self.info["all_4bit"] = all(isinstance(m.base_layer, bnb.nn.Linear4bit) for _, m in layers)
        state4 = layers[0][1].base_layer.weight.quant_state
        self.info["quant_type"] = state4.quant_type
        self.info["double_quant"] = bool(getattr(state4, "nested", False))
        self.info["trainable"] = sorted(
            {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad}
        )
        self.before = self._watched(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = self._watched(model)


def _lora_layers(model):
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            yield name, module


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data") / "chat.jsonl")


@pytest.fixture(scope="module")
def module_store(tmp_path_factory, test_cache, base_info) -> Store:
    return Store(tmp_path_factory.mktemp("home"), cache=test_cache / "bases")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data, module_store):
    """An uninterrupted 3-step run, in-process, observed by `Probe`."""
    root = tmp_path_factory.mktemp("reference")
    recipe = load_recipe(write_recipe(root / "recipe.yaml", tiny_data, root / "adapter"))
    probe = Probe()
    result = run(recipe, store=module_store, progress=False, callbacks=[probe])
    return result, probe


def test_lora_sits_on_nf4_double_quantised_4bit_layers(reference):
    _, probe = reference
    assert probe.info["lora_layers"] == 30 * 7  # all-linear: q,k,v,o,gate,up,down per layer
    assert probe.info["all_4bit"]
    assert probe.info["quant_type"] == "nf4"
    assert probe.info["double_quant"]
    assert probe.info["trainable"] == ["lora_A", "lora_B"]


def test_loss_is_finite_and_only_lora_weights_changed(reference):
    import torch

    result, probe = reference
    rows = read_metrics(result.adapter_dir / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert any("eval_loss" in r and math.isfinite(r["eval_loss"]) for r in rows)
    assert torch.equal(probe.before["_absmax"], probe.after["_absmax"])
    changed_lora = 0
    for name, entry in probe.before.items():
        if name == "_absmax":
            continue
        before, trainable, dtype = entry
        after = probe.after[name][0]
        if "lora_" in name:
            assert trainable and dtype == "torch.float32", (name, dtype)  # fp32 on CPU
            changed_lora += int(not torch.equal(before, after))
        else:
            assert not trainable and torch.equal(before, after), name
    assert changed_lora == sum(1 for n in probe.before if "lora_" in n)


def test_adapter_folder_is_complete_and_loads_with_peft(reference, base_info):
    import torch
    from peft import PeftModel

    from tests.factories import load_base_model

    result, _ = reference
    folder = result.adapter_dir
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                     "data", "loradock.json", "loss.png", "metrics.jsonl"]
    assert sorted(p.name for p in (folder / "data").iterdir()) == [
        "data_report.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
    assert not work_dir_for(folder).exists()  # checkpoints removed after success
    base_template = (Path(base_info.path) / "chat_template.jinja").read_bytes()
    assert (folder / "chat_template.jinja").read_bytes() == base_template
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    manifest = AdapterManifest.read(folder)
    assert manifest.base == {"name": "smollm2", "fingerprint": base_info.fingerprint,
                             "source": base_info.hf_id}
    assert manifest.method == "sft" and manifest.parent is None
    assert manifest.quantization == {"load_in_4bit": True, "quant_type": "nf4",
                                     "double_quant": True, "compute_dtype": "float32"}
    assert manifest.hyperparameters["r"] == 4 and manifest.hyperparameters["max_steps"] == 3
    assert manifest.data["sha256"] and manifest.data["rows_kept"] == 40
    compute = manifest.compute
    assert compute["device"] == "cpu" and compute["steps"] == 3 and compute["tokens_seen"] > 0
    assert compute["estimated_flops"] == 6 * compute["total_parameters"] * compute["tokens_seen"]
    assert compute["torch_threads"] >= 1 and compute["wall_time_s"] > 0
    assert manifest.intended_use == "tests" and manifest.license == "apache-2.0"
    assert manifest.extra["card"] == {} and manifest.extra["system_prompt"] == ""

    model = load_base_model(base_info)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(model, str(folder))
        adapted = peft_model(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_info.hf_id and config["r"] == 4


def test_dequantized_base_gives_the_adapter_the_numbers_it_trained_on(reference, base_info):
    import torch
    from peft import PeftModel

    from hub.nf4 import dense_nf4_model, trained_4bit
    from train.quant import QuantSpec, four_bit_modules, load_quantized_base

    result, _ = reference
    spec = QuantSpec.for_device("cpu")
    ids = torch.tensor([[1, 504, 3251, 314, 253, 1345, 28, 2]])
    with torch.no_grad():
        four_bit = PeftModel.from_pretrained(
            load_quantized_base(base_info.path, spec, gradient_checkpointing=False),
            str(result.adapter_dir)).eval()
        expected = four_bit(input_ids=ids).logits
        del four_bit
        plain = dense_nf4_model(base_info.path, **trained_4bit(spec.record()),
                                compute_dtype=spec.compute_dtype)
        assert four_bit_modules(plain) == []  # ordinary float layers
        got = PeftModel.from_pretrained(plain, str(result.adapter_dir)).eval()(input_ids=ids).logits
    assert torch.equal(got, expected)


def _cli(recipe: Path, out: Path, *extra: str, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "loradock.cli", "train", str(recipe), "--out", str(out),
           "--no-eval", "--no-progress", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_killed_run_resumes_and_matches_the_uninterrupted_run(reference, tiny_data, tmp_path,
                                                               module_store):
    from safetensors.torch import load_file

    ref_result, _ = reference
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_data, tmp_path / "unused")
    out = tmp_path / "adapter"
    env = {**os.environ, "LORADOCK_HOME": str(module_store.home),
           "LORADOCK_CACHE": str(module_store.cache), "OMP_WAIT_POLICY": "PASSIVE"}

    proc = _cli(recipe, out, env=env)
    marker = work_dir_for(out) / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing published by the killed run
    killed_rows = read_metrics(work_dir_for(out) / "metrics.jsonl")

    without = _cli(recipe, out, env=env)
    text = without.communicate()[0]
    assert without.returncode != 0 and "--resume" in text  # refuses to silently start over

    resumed = _cli(recipe, out, "--resume", env=env)
    text = resumed.communicate()[0]
    assert resumed.returncode == 0, text

    manifest = AdapterManifest.read(out)
    assert manifest.compute["resumed_from_step"] == 2 and manifest.compute["steps"] == 3
    rows = read_metrics(out / "metrics.jsonl")
    train = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(train) == [1, 2, 3]  # the curve continues from the checkpoint
    killed_train = {r["step"]: r for r in killed_rows if "loss" in r}
    for step in (1, 2):  # kept from the killed run, not redone
        assert train[step] == killed_train[step]
    assert train[3]["elapsed_s"] > train[2]["elapsed_s"]
    reference_rows = {r["step"]: r for r in read_metrics(ref_result.adapter_dir / "metrics.jsonl")
                      if "loss" in r}
    for step in (1, 2, 3):
        assert train[step]["loss"] == pytest.approx(reference_rows[step]["loss"], rel=RTOL)

    ours = load_file(str(out / "adapter_model.safetensors"))
    theirs = load_file(str(ref_result.adapter_dir / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    worst = max(
        float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max().clamp_min(1e-12))
        for k in ours if "lora_B" in k
    )
    print(f"resumed vs uninterrupted: largest lora_B difference {worst:.2e} of its max |w|")
    assert worst <= RTOL, worst
