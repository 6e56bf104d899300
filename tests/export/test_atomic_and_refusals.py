"""Exports never leave a partial file under the final name, and unsupported inputs are refused.

The kill test runs a real ``export gguf`` in a subprocess and SIGKILLs it while the GGUF is being
written: the final name must not exist, only hidden ``.tmp-*`` leftovers.
"""

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

from export.config import ParityOptions
from export.gguf_writer import check_architecture, write_model_gguf
from export.lora_gguf import write_lora_gguf
from export.pipeline import export_gguf, export_lora_gguf
from hub.errors import Unsupported
from hub.files import TMP_PREFIX
from tests.factories import set_base_reference

REPO = Path(__file__).resolve().parents[2]
KILL_SCRIPT = """
import sys
from loradock.cli_export import app
app(["gguf", "demo", "--quant", "f16", "--out", sys.argv[1], "--prompts", "1",
     "--max-tokens", "4", "--json"])
"""


def test_kill_during_export_leaves_nothing_under_the_final_name(store, adapter_factory,
                                                               tmp_path: Path) -> None:
    store.register(adapter_factory(seed=1), "demo")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = (tmp_path / "export.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    killed_at = None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            # Past the header and into the tokenizer/tensor data: a truncated GGUF.
            partial = [p for p in out.glob(f"{TMP_PREFIX}*") if p.is_file()
                       and p.stat().st_size > 1 << 20] if out.is_dir() else []
            if partial:
                killed_at = partial[0].stat().st_size
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    log_tail = (tmp_path / "export.log").read_text()[-2000:]
    assert killed_at is not None, f"export ended before the write was seen: {log_tail}"
    names = [p.name for p in out.iterdir()]
    print(f"killed with {killed_at} bytes written; left: {names}")
    assert not (out / "demo-v1.f16.gguf").exists()
    assert not (out / "demo-v1.f16.parity.json").exists()
    assert names and all(name.startswith(TMP_PREFIX) for name in names)


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"])
def test_unsupported_architecture_is_refused_by_name(arch: str) -> None:
    with pytest.raises(Unsupported, match=arch):
        check_architecture({"architectures": [arch]})


def _other_arch_base(base_info, folder: Path, arch: str) -> Path:
    folder.mkdir()
    for src in Path(base_info.path).iterdir():
        try:
            os.link(src, folder / src.name)
        except OSError:
            shutil.copy2(src, folder / src.name)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = [arch]
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_export_of_an_unsupported_base_is_refused_before_writing(store, base_info,
                                                                 adapter_factory,
                                                                 tmp_path: Path) -> None:
    other = _other_arch_base(base_info, tmp_path / "other-base", "FooForCausalLM")
    store.add_base("other", other)
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_factory(seed=1), adapter)
    set_base_reference(adapter, None)
    store.register(adapter, "odd", base="other")
    out = tmp_path / "out"
    for export in (export_gguf, export_lora_gguf):
        with pytest.raises(Unsupported, match="FooForCausalLM"):
            export(store, "odd", None, out, parity=ParityOptions(prompts=1, max_tokens=2))
    with pytest.raises(Unsupported, match="FooForCausalLM"):
        write_model_gguf(other, tmp_path / "direct.gguf")
    assert not out.exists() and not (tmp_path / "direct.gguf").exists()


def test_rope_scaling_is_refused(base_info, tmp_path: Path) -> None:
    folder = _other_arch_base(base_info, tmp_path / "llama3-rope", "LlamaForCausalLM")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Unsupported, match="llama3"):
        write_model_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_dora_adapter_cannot_become_a_gguf_lora(base_info, adapter_factory,
                                                tmp_path: Path) -> None:
    config = json.loads((Path(base_info.path) / "config.json").read_text())
    with pytest.raises(Unsupported, match="DoRA"):
        write_lora_gguf(adapter_factory(seed=2, use_dora=True), config, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_lora_gguf_products_equal_peft_deltas(base_info, adapter_factory,
                                              tmp_path: Path) -> None:
    """B·A·alpha/r read back from the GGUF equals PEFT's delta (permuted for q/k), including
    rsLoRA and per-module rank/alpha patterns folded into lora_b."""
    import gguf
    import numpy as np
    import torch
    from peft import PeftModel

    from export.gguf_writer import permute_rotary
    from tests.factories import load_base_model

    folder = adapter_factory(seed=3, targets=ALL_LINEAR, use_rslora=True,
                             rank_pattern={"v_proj": 4}, alpha_pattern={"k_proj": 4})
    config = json.loads((Path(base_info.path) / "config.json").read_text())
    summary = write_lora_gguf(folder, config, tmp_path / "a.gguf")
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    assert summary.pairs == 30 * len(ALL_LINEAR) and len(tensors) == 2 * summary.pairs

    model = PeftModel.from_pretrained(load_base_model(base_info), str(folder))
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    checked = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in names or not hasattr(module, "get_delta_weight"):
            continue
        layer = int(name.split("layers.")[1].split(".")[0])
        with torch.no_grad():
            delta = module.get_delta_weight("default").double().numpy()
        if leaf in ("q_proj", "k_proj"):
            delta = permute_rotary(delta, 9 if leaf == "q_proj" else 3)
        a = tensors[f"blk.{layer}.{names[leaf]}.weight.lora_a"]
        b = tensors[f"blk.{layer}.{names[leaf]}.weight.lora_b"]
        ours = b @ a * (alpha / a.shape[0])  # what llama.cpp computes
        np.testing.assert_allclose(ours, delta, rtol=1e-4, atol=1e-6, err_msg=name)
        checked += 1
    assert checked == summary.pairs
