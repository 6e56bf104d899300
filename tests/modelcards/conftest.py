"""An evaluated adapter folder shared by the card tests: real LoRA, real run_eval, a manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hub.manifest import AdapterManifest

FULL_CARD = {
    "language": ["en"],
    "provider": "Example Org, ai@example.org",
    "release": "2025-12-01, Hugging Face Hub",
    "copyright_policy": "Only data written by our team or licensed for training is used.",
    "data_sources": {"other": "Rows written by the loradock team for this example."},
    "rights_reservations": "No third-party content was collected, so no opt-out applied.",
    "illegal_content": "Every row was read by a person before training.",
    "known_biases": "English only; the names are mostly Western European.",
    "tags": ["json-extraction"],
}


def make_manifest(base, card: dict | None = None, **overrides) -> AdapterManifest:
    """A manifest shaped like the one train writes (figures chosen by the test)."""
    fields = dict(
        base={"name": base.name, "fingerprint": base.fingerprint, "source": "embedded"},
        method="sft",
        data={
            "source": "examples/json_extract.jsonl",
            "sha256": "0123456789abcdef" * 4,
            "format": "messages",
            "rows_in": 310,
            "rows_kept": 297,
            "splits": {"train": 237, "validation": 30, "test": 30},
            "dropped": {"exact_duplicate": 9, "too_long": 3, "empty_field": 1},
            "pii": {"email": 2, "phone": 1, "policy": "redact"},
        },
        hyperparameters={
            "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "learning_rate": 0.0002,
            "max_steps": 60, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
            "max_seq_len": 256, "warmup_ratio": 0.1, "lr_scheduler_type": "cosine", "seed": 7,
            "target_modules": ["q_proj", "v_proj"],
        },
        quantization={"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                      "compute_dtype": "float32"},
        compute={"device": "cpu", "wall_time_s": 287.4, "tokens_seen": 123456,
                 "estimated_flops": 9.96e13, "torch_threads": 2},
        intended_use="Extract a person's name from a sentence as a JSON object.",
        out_of_scope_use="Any decision about a person; languages other than English.",
        license="Apache-2.0",
        created_at="2025-11-23T10:00:00Z",
        loradock_version="0.1.0",
        extra={"card": card if card is not None else dict(FULL_CARD)},
    )
    fields.update(overrides)
    return AdapterManifest(**fields)


@pytest.fixture(scope="session")
def evaluated_adapter(adapter_factory, base_info, tmp_path_factory) -> Path:
    """A LoRA folder with loradock.json, chat_template.jinja and a real eval.json."""
    from train.eval import run_eval

    root = tmp_path_factory.mktemp("card")
    folder = root / "json-extract"
    shutil.copytree(adapter_factory(seed=5), folder)
    (folder / "chat_template.jinja").write_text(
        Path(base_info.path, "chat_template.jinja").read_text()
    )
    data = root / "data"
    data.mkdir()
    rows = [
        {"messages": [{"role": "user", "content": f"Name as JSON: I am {n}."},
                      {"role": "assistant", "content": json.dumps({"name": n})}], "line": i + 1}
        for i, n in enumerate(["Ann", "Bob", "Cid", "Dee"])
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    run_eval(folder, base_info, data, few_shot_k=1, max_new_tokens=6, forgetting_texts=2,
             sample_prompts=["Name as JSON: I am Eve."])
    return folder


@pytest.fixture
def card_folder(evaluated_adapter: Path, tmp_path: Path) -> Path:
    """A private copy of the evaluated folder (tests write manifests and cards into it)."""
    folder = tmp_path / "json-extract"
    shutil.copytree(evaluated_adapter, folder)
    return folder
