"""GGUF exports of every family the peft engine serves, through llama.cpp's own converter.

For each family a tiny random checkpoint (`tests.tiny_models`) with an all-linear LoRA is
exported as a GGUF LoRA; llama.cpp (the pinned llama-cpp-python) must load it on the base's
f16 GGUF and pass the parity gate against PEFT on the fp32 base. The merged q8_0 GGUF of every
family (an all-linear QLoRA adapter) is exported in `tests.test_journey_families`, which
shares these taught bases. The base is first taught the
parity prompts (`tests.tiny_models.teach_tiny_base`), so lossy formats are judged on confident
predictions, not on the near-ties of random weights. Two configs differ from the
lead's serving fixtures where llama.cpp itself differs from transformers, as real checkpoints
do not: Mistral without a sliding window (llama.cpp's ``llama`` architecture has none; Mistral
v0.2+ ship ``sliding_window: null``) and Gemma 3 with six layers (llama.cpp fixes Gemma 3's
5-local:1-global layer pattern, which the real models follow).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from export.config import ParityOptions
from tests.tiny_models import ALL_LINEAR, FAMILY_CONFIGS

PARITY = ParityOptions(prompts=4, max_tokens=16)
LLAMA_CPP_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                  "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
# Where llama.cpp differs from transformers, configs as the real checkpoints have them.
EXPORT_OVERRIDES: dict[str, dict] = {
    "mistral": {"sliding_window": None},
    "gemma3_text": {"num_hidden_layers": 6, "layer_types": None},
}


def base_name(family: str) -> str:
    """A base name llama.cpp keys no tokenizer rule on (it special-cases names with "phi3")."""
    return "tiny-" + {"phi3": "phi-three", "gemma3_text": "gemma3"}.get(family, family)


def tiny_exportable(family: str, out: Path, tokenizer_from: Path) -> Path:
    """A tiny ``family`` base taught the parity prompts (confident, as a trained model is)."""
    from transformers import AutoTokenizer

    from export.parity import BUNDLED_PROMPTS
    from tests.tiny_models import make_tiny_base, teach_tiny_base

    path = make_tiny_base(family, out, tokenizer_from, **EXPORT_OVERRIDES.get(family, {}))
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [tokenizer.apply_chat_template(
                 [{"role": "user", "content": prompt},
                  {"role": "assistant", "content": "Sure: " + prompt[::-1]}], tokenize=False)
             for prompt in BUNDLED_PROMPTS[:PARITY.prompts]]
    return teach_tiny_base(path, texts)


_TAUGHT: dict[str, Path] = {}


def shared_exportable(family: str, tmp_path_factory: pytest.TempPathFactory,
                      tokenizer_from: Path) -> Path:
    """`tiny_exportable`, built once per session per family (this test and the journey's).

    Callers only read the folder (the store registers it in place or downloads a copy).
    """
    if family not in _TAUGHT:
        root = tmp_path_factory.mktemp(f"taught-{family}")
        _TAUGHT[family] = tiny_exportable(family, root / base_name(family), tokenizer_from)
    return _TAUGHT[family]


def _meta(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    return {"arch": bytes(field.parts[field.data[0]]).decode(),
            "types": {t.tensor_type.name for t in reader.tensors}}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_family_exports_a_gguf_lora_that_passes_parity(family, tmp_path, tmp_path_factory,
                                                       base_info):
    import torch
    from transformers import AutoModelForCausalLM

    from export.pipeline import export_lora_gguf
    from hub.store import Store
    from tests.conftest import TEST_CACHE
    from tests.factories import make_lora

    store = Store(tmp_path / "home", cache=TEST_CACHE / "bases")
    path = shared_exportable(family, tmp_path_factory, Path(base_info.path))
    store.add_base(base_name(family), path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    folder = make_lora(model, tmp_path / "adapter", r=8, targets=ALL_LINEAR[family], seed=1,
                       scale=0.05)
    store.register(folder, "demo", base=base_name(family))

    out = tmp_path / "out"
    lora = export_lora_gguf(store, "demo", None, out, parity=PARITY)
    print(f"[{family} lora] {lora.parity[0].line()}")
    assert lora.parity[0].passed
    base = store.base(base_name(family))
    base_file = Path(store.cache) / "gguf" / f"{base.name}-{base.fingerprint[:16]}.f16.gguf"
    assert _meta(base_file)["arch"] == LLAMA_CPP_ARCH[family]
    assert not list(out.glob(".tmp-*"))
