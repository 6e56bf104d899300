"""`run_eval` end to end on the real SmolLM2 with a real PEFT adapter and tiny canonical data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hub.errors import InvalidInput, NotFound
from train.eval import run_eval
from train.eval.generate import greedy_generate, load

NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus"]
EVAL_KEYS = {
    "schema", "kind", "created_at", "adapter", "base", "device", "metric_definitions", "data",
    "primary_metric", "decoding", "systems", "worst_examples", "examples", "verdict",
    "forgetting", "wall_time_s", "samples",
}


def _sft(name: str, line: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Extract the name as JSON: My name is {name}."},
            {"role": "assistant", "content": json.dumps({"name": name})},
        ],
        "line": line,
    }


def _write(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def adapter_copy(adapter_factory, tmp_path: Path) -> Path:
    """A private copy of a random LoRA (run_eval writes into the folder)."""
    folder = tmp_path / "adapter"
    shutil.copytree(adapter_factory(seed=3), folder)
    return folder


def test_run_eval_sft_end_to_end(adapter_copy: Path, base_info, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write(data, "train", [_sft(n, i + 1) for i, n in enumerate(NAMES[:4])])
    _write(data, "test", [_sft(n, i + 1) for i, n in enumerate(NAMES[4:])])
    template = Path(base_info.path, "chat_template.jinja").read_text()
    (adapter_copy / "chat_template.jinja").write_text(template)
    (adapter_copy / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # the report only links it

    result = run_eval(
        adapter_copy, base_info, data, few_shot_k=2, max_new_tokens=12, forgetting_texts=3,
        max_examples=2, sample_prompts=["My name is Zoe."],
    )

    doc = json.loads((adapter_copy / "eval.json").read_text())
    assert doc == result.doc
    assert EVAL_KEYS <= set(doc)
    assert doc["kind"] == "sft" and doc["primary_metric"] == "exact_match"
    assert doc["adapter"]["chat_template"] == "adapter"
    assert doc["base"]["precision"] == "float32" and doc["base"]["quantized"] is False
    assert doc["data"]["test_rows"] == 3 and doc["data"]["evaluated"] == 2
    assert doc["data"]["few_shot_k"] == 2 and len(doc["data"]["few_shot_lines"]) == 2
    assert doc["data"]["json_references"] == 2
    assert set(doc["systems"]) == {"base", "few_shot", "adapter"}
    for system in doc["systems"].values():
        assert system["perplexity"] > 1.0
        assert 0.0 <= system["rouge_l"] <= 1.0
        assert system["json_validity"] is not None
    # The same assistant tokens are scored in every system.
    assert len({s["scored_tokens"] for s in doc["systems"].values()}) == 1
    # Aggregates are the means of the per-example scores the file records.
    for system, figures in doc["systems"].items():
        per = [ex["exact_match"][system] for ex in doc["examples"]]
        assert figures["exact_match"] == pytest.approx(sum(per) / len(per))
    verdict = doc["verdict"]
    assert verdict["baseline"] == "few_shot"
    assert verdict["adapter"] == doc["systems"]["adapter"]["exact_match"]
    assert verdict["passed"] == result.passed
    assert verdict["sentence"] in (adapter_copy / "eval_report.md").read_text()
    forgetting = doc["forgetting"]
    assert forgetting["texts"] == 3 and forgetting["base_perplexity"] > 1.0
    assert forgetting["forgetting"] == (forgetting["relative_change"] > 0.10)
    report = result.report_path.read_text()
    assert "![train and validation loss](loss.png)" in report
    assert len(doc["worst_examples"]) == 2
    assert [s["prompt"] for s in doc["samples"]] == ["My name is Zoe."]
    assert "## Sample prompts" in report


def test_batched_left_padded_generation_equals_one_at_a_time(adapter_copy, base_info) -> None:
    loaded = load(adapter_copy, base_info)
    prompts = [
        [{"role": "user", "content": "Say hi."}],
        [{"role": "user", "content": "List three colours of the rainbow, separated by commas."}],
    ]
    for system in ("base", "adapter"):
        batched = greedy_generate(loaded, system, prompts, max_new_tokens=6, batch_size=2)
        alone = [greedy_generate(loaded, system, [p], max_new_tokens=6)[0] for p in prompts]
        assert batched == alone
    base_out = greedy_generate(loaded, "base", prompts[:1], max_new_tokens=6)
    adapter_out = greedy_generate(loaded, "adapter", prompts[:1], max_new_tokens=6)
    assert base_out != adapter_out  # the adapter is really applied (random LoRA, seed 3)


def test_run_eval_preference_rows(adapter_copy: Path, base_info, tmp_path: Path) -> None:
    data = tmp_path / "pref"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Greet {n} politely."}],
            "chosen": [{"role": "assistant", "content": f"Hello {n}, nice to meet you."}],
            "rejected": [{"role": "assistant", "content": f"What do you want, {n}?"}],
            "line": i + 1,
        }
        for i, n in enumerate(NAMES[:2])
    ]
    _write(data, "test", rows)
    result = run_eval(adapter_copy, base_info, data, forgetting_texts=1)
    doc = result.doc
    assert doc["kind"] == "preference" and doc["primary_metric"] == "preference_accuracy"
    assert set(doc["systems"]) == {"base", "adapter"}
    assert doc["verdict"]["baseline"] == "base"
    for ex in doc["examples"]:
        assert set(ex["logp"]) == {"base", "adapter"}
    wins = [float(ex["logp"]["adapter"]["chosen"] > ex["logp"]["adapter"]["rejected"])
            for ex in doc["examples"]]
    assert doc["systems"]["adapter"]["preference_accuracy"] == sum(wins) / len(wins)


def test_run_eval_refuses_missing_and_raw_data(adapter_copy: Path, base_info, tmp_path) -> None:
    with pytest.raises(NotFound):
        run_eval(adapter_copy, base_info, tmp_path / "nowhere")
    raw = tmp_path / "raw"
    _write(raw, "test", [{"instruction": "Say hi", "output": "hi"}])
    with pytest.raises(InvalidInput, match="test.jsonl:1"):
        run_eval(adapter_copy, base_info, raw)


def test_qlora_adapter_is_evaluated_on_the_base_it_trained_on(adapter_copy: Path, base_info,
                                                              tmp_path: Path) -> None:
    """A manifest saying load_in_4bit makes all three systems run the NF4 values, dequantised."""
    import torch

    from hub.manifest import AdapterManifest
    from hub.nf4 import dense_nf4_model, trained_4bit
    from train.quant import QuantSpec

    spec = QuantSpec.for_device("cpu")
    AdapterManifest(base={"name": base_info.name}, quantization=spec.record()).write(adapter_copy)
    data = tmp_path / "data"
    _write(data, "train", [_sft("Bob", 1)])
    _write(data, "test", [_sft("Ann", 1)])

    result = run_eval(adapter_copy, base_info, data, few_shot_k=1, max_new_tokens=4,
                      forgetting_texts=1)

    systems = result.doc["systems"]
    # The few-shot base also runs on the original weights; the verdict takes the stronger one.
    assert set(systems) == {"base", "few_shot", "few_shot_original", "adapter"}
    assert systems["few_shot_original"]["perplexity"] != systems["few_shot"]["perplexity"]
    best = max(("few_shot", "few_shot_original"),
               key=lambda s: (systems[s]["exact_match"], s == "few_shot"))
    assert result.doc["verdict"]["baseline"] == best
    assert "few-shot base, original weights (1-shot)" in result.report_path.read_text()
    assert result.doc["base"]["quantized"] is True
    assert result.doc["base"]["weights"] == (
        "nf4 4-bit (double quant) dequantised to float32, as in training"
    )
    assert "nf4 4-bit (double quant) dequantised" in result.report_path.read_text()
    loaded = load(adapter_copy, base_info, quantization=spec.record())
    with loaded.system("base") as model:
        layer = model.base_model.model.model.layers[0].mlp.down_proj
        weight = getattr(layer, "base_layer", layer).weight
    expected = dense_nf4_model(base_info.path, **trained_4bit(spec.record())
                               ).model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, expected)
    unquantised = load(adapter_copy, base_info)
    plain = unquantised.model.base_model.model.model.layers[0].mlp.down_proj
    assert not torch.equal(getattr(plain, "base_layer", plain).weight, expected)
