"""Exports of a real adapter: merged, f16, q8_0, GGUF LoRA and Ollama builds, each parity-checked.

Every exported file is loaded by llama-cpp-python, answers a prompt, and is compared with the PEFT
adapter on the unmerged base (teacher-forced top-1 agreement). Figures are printed (``pytest -s``).
Few prompts and tokens keep this inside the test budget; `loradock export` defaults to 8 x 32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.config import GgufOptions, MergeOptions, OllamaOptions, ParityOptions
from export.gotemplate import render as render_go
from export.ollama import ADAPTER_NOTE, export_ollama
from export.pipeline import base_gguf, export_gguf, export_lora_gguf, export_merged, reference_for
from export.templates import ollama_values, render_chat, translate

PARITY = ParityOptions(prompts=4, max_tokens=16)


def _show(label: str, result) -> None:
    for report in result.parity:
        print(f"[{label}] {report.line()} | answer: {report.sample[:60]!r}")


def _gguf_meta(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("tokenizer.ggml.tokens"):
            continue
        try:
            meta[key] = fld.contents()
        except (ValueError, TypeError):
            continue
    meta["tensors"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return meta


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def demo(store, adapter_factory):
    """A LoRA on every linear layer (q and k exercise the rotary permutation of lora_b)."""
    return store.register(adapter_factory(seed=1, targets=ALL_LINEAR, scale=0.02), "demo")


def test_exports_load_answer_and_meet_parity(store, demo, tmp_path: Path) -> None:
    from export.gguf_writer import write_model_gguf
    from export.parity import gguf_parity

    out = tmp_path / "exports"

    merged = export_merged(store, "demo", None, out / "merged",
                           options=MergeOptions(dtype="fp16"), parity=PARITY)
    _show("merged fp16", merged)
    drift = merged.drift
    print(f"[merged fp16] drift vs {drift.reference}: top-1 {drift.top1_agreement:.1%}, "
          f"mean |dlogit| {drift.mean_abs_dlogit:.4f} ({drift.note})")
    folder = out / "merged"
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja",
            "README.md", "export.json"} <= {p.name for p in folder.iterdir()}
    assert merged.parity[0].passed and drift.positions > 0
    # The merged folder itself converts to GGUF and llama.cpp answers like the adapter.
    reference = reference_for(demo, store.base("smollm2"), PARITY)
    write_model_gguf(folder, tmp_path / "merged-folder.f16.gguf", dtype="f16")
    from_folder = gguf_parity(tmp_path / "merged-folder.f16.gguf", reference, kind="f16",
                              threshold=0.99)
    print(f"[merged folder -> gguf] {from_folder.line()}")
    assert from_folder.passed and from_folder.sample.strip()

    for quant in ("f16", "q8_0"):
        result = export_gguf(store, "demo", None, out, options=GgufOptions(quant=quant),
                             parity=PARITY)
        _show(quant, result)
        report = result.parity[0]
        assert report.passed and report.sample.strip() and not report.tokenizer_mismatches
        path = out / f"demo-v1.{quant}.gguf"
        assert result.paths == [path]
        meta = _gguf_meta(path)
        assert meta["general.architecture"] == "llama"
        assert meta["tokenizer.ggml.pre"] == "smollm"
        assert "output.weight" not in meta["tensors"]  # tied embeddings
        assert meta["tokenizer.chat_template"].startswith("{% for message in messages %}")
        saved = json.loads(path.with_suffix(".parity.json").read_text())
        assert saved["parity"][0]["agreement"] == report.agreement

    lora = export_lora_gguf(store, "demo", None, out, parity=PARITY)
    _show("lora on f16 base", lora)
    assert lora.parity[0].passed and lora.parity[0].sample.strip()
    meta = _gguf_meta(out / "demo-v1.lora.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(16.0)
    for target in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        assert f"blk.29.{target}.weight.lora_a" in meta["tensors"]
        assert f"blk.29.{target}.weight.lora_b" in meta["tensors"]


def test_ollama_builds_merged_and_adapter_only(store, demo, tmp_path: Path, capsys) -> None:
    merged = export_ollama(store, "demo", None, tmp_path / "ollama",
                           options=OllamaOptions(quant="f16", create=False), parity=PARITY)
    _show("ollama merged f16", merged)
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert "FROM ./demo-v1.f16.gguf" in modelfile and "ADAPTER" not in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'LICENSE """' in modelfile
    assert merged.commands == [
        f"cd {tmp_path / 'ollama'} && ollama create demo:v1 -f Modelfile", "ollama run demo:v1"]
    # The TEMPLATE in the Modelfile renders exactly what training's Jinja template rendered.
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    chat = (Path(store.base("smollm2").path) / "chat_template.jinja").read_text()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    assert render_go(template, ollama_values(messages)) == render_chat(
        chat, messages, add_generation_prompt=True)
    assert translate(chat).go_template == template

    only = export_ollama(store, "demo", None, tmp_path / "ollama-adapter",
                         options=OllamaOptions(quant="f16", adapter_only=True, create=False),
                         parity=PARITY)
    _show("ollama adapter-only", only)
    modelfile = (tmp_path / "ollama-adapter" / "Modelfile").read_text()
    assert "FROM ./smollm2.f16.gguf" in modelfile
    assert "ADAPTER ./demo-v1.lora.gguf" in modelfile
    assert ADAPTER_NOTE in only.notes and "narrower" in modelfile
    assert (tmp_path / "ollama-adapter" / "smollm2.f16.gguf").stat().st_size > 100_000_000


def test_base_gguf_tokenizer_matches_the_reference_gguf(store) -> None:
    """Our f16 base GGUF carries the same tokenizer metadata llama.cpp's own file carries."""
    import gguf

    from hub.bases import embedded_gguf_path

    ours = gguf.GGUFReader(base_gguf(store, store.base("smollm2")))
    ref = gguf.GGUFReader(embedded_gguf_path())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
                "llama.context_length", "llama.embedding_length", "llama.block_count",
                "llama.feed_forward_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count"):
        assert ours.fields[key].contents() == ref.fields[key].contents(), key


def test_rotary_permutation_matches_llama_cpp_layout(base_info) -> None:
    """q/k rows permuted from the HF folder equal llama.cpp's own (dequantised) tensors."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    from export.gguf_writer import permute_rotary
    from hub.bases import embedded_gguf_path

    tensors = {t.name: t for t in gguf.GGUFReader(embedded_gguf_path()).tensors}
    weights = next(Path(base_info.path).glob("*.safetensors"))
    with safe_open(str(weights), framework="numpy") as fh:
        for hf, gg, heads in (("q_proj", "attn_q", 9), ("k_proj", "attn_k", 3)):
            ours = permute_rotary(fh.get_tensor(f"model.layers.3.self_attn.{hf}.weight"), heads)
            theirs = tensors[f"blk.3.{gg}.weight"]
            theirs = gguf.quants.dequantize(theirs.data, theirs.tensor_type)
            assert np.array_equal(ours, theirs), hf
            unpermuted = fh.get_tensor(f"model.layers.3.self_attn.{hf}.weight")
            assert not np.array_equal(unpermuted, theirs)
