"""The llamacpp engine on non-Llama bases: base GGUF and GGUF LoRA built by llama.cpp's converters.

A tiny random ``family`` checkpoint (`tests.tiny_models`) is registered as a base with no
``gguf=`` option: the engine converts the base once into its cache (``convert_hf_to_gguf``,
f16) and the adapter with ``convert_lora_to_gguf``, then answers greedy requests. Its tokens must
equal llama.cpp run directly on the same two files with export's parity runner
(`export.parity._greedy`), and the adapter must change the output. The converter comes from the
llama-cpp-python sdist already in the test cache (no network).
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed in this interpreter")

from hub.errors import Unsupported  # noqa: E402
from serve.engine import EngineConfig, GenerationRequest, SamplingParams, create_engine  # noqa: E402
from tests.tiny_models import ALL_LINEAR  # noqa: E402

_ids = itertools.count()
MAX_TOKENS = 12


def _sdist() -> Path:
    """The pinned llama-cpp-python sdist: where `make` put it (SDIST_ENV), else the test cache."""
    import os

    from export.llama_convert import SDIST_ENV, llama_cpp_version
    from tests.conftest import TEST_CACHE

    path = TEST_CACHE / "bases" / "sdist" / f"llama_cpp_python-{llama_cpp_version()}.tar.gz"
    given = Path(os.environ.get(SDIST_ENV, ""))
    if os.environ.get(SDIST_ENV) and given.is_file():
        return given
    if not path.is_file():
        pytest.skip(f"{path.name} is not in the test cache nor at ${SDIST_ENV} (needed offline)")
    return path


async def _answer(engine, prompt: list[int], record=None) -> list[int]:
    request = GenerationRequest(f"lcf-{next(_ids)}", list(prompt), record,
                                SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return [t for chunk in [c async for c in engine.generate(request)] for t in chunk.token_ids]


def _direct(base_file: Path, lora_file: Path | None, prompt: list[int]) -> list[int]:
    """The same GGUF (+ LoRA) in llama.cpp through export's parity runner."""
    import llama_cpp

    from export.parity import _greedy

    llm = llama_cpp.Llama(model_path=str(base_file), n_ctx=256, n_batch=256, n_ubatch=256,
                          n_threads=1, n_threads_batch=1, verbose=False,
                          lora_path=str(lora_file) if lora_file else None)
    try:
        return _greedy(llm, prompt, MAX_TOKENS)
    finally:
        llm.close()


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_engine_serves_a_converted_family_adapter_like_llama_cpp(family, tmp_path, base_info,
                                                                 monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export.llama_convert import SDIST_ENV
    from hub.store import Store
    from tests.factories import make_lora
    from tests.tiny_models import make_tiny_base

    monkeypatch.setenv(SDIST_ENV, str(_sdist()))
    name = f"tiny-{family}"
    path = make_tiny_base(family, tmp_path / name, Path(base_info.path))
    store = Store(tmp_path / "home", cache=tmp_path / "base-cache")
    base = store.add_base(name, path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    record = store.register(make_lora(model, tmp_path / "adapter", r=8, seed=3, scale=0.5,
                                      targets=ALL_LINEAR[family]), "demo", base=name)
    del model
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = list(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about the sea."}],
        add_generation_prompt=True, tokenize=True, return_dict=False))

    cache = tmp_path / "engine-cache"
    config = EngineConfig(base=base, max_model_len=256, threads=1,
                          options={"cache_dir": str(cache)})
    engine = create_engine("llamacpp", config)

    async def serve() -> tuple[list[int], list[int], list[int]]:
        await engine.start()
        try:
            with_lora = await _answer(engine, prompt, record)
            bare = await _answer(engine, prompt)
            again = await _answer(engine, prompt, record)
            return with_lora, bare, again
        finally:
            await engine.shutdown(drain_timeout_s=5)

    with_lora, bare, again = asyncio.run(serve())
    base_file = cache / "gguf" / f"{name}-{base.fingerprint[:16]}.f16.gguf"
    lora_file = engine.lora_path(record)
    assert base_file.is_file() and lora_file.is_file()
    assert len(with_lora) == MAX_TOKENS
    assert with_lora == again  # deterministic after switching away and back
    assert with_lora != bare  # the adapter changes the answer
    assert with_lora == _direct(base_file, lora_file, prompt)
    assert bare == _direct(base_file, None, prompt)


def test_missing_converter_names_the_fix(tmp_path, base_info, monkeypatch):
    from export.llama_convert import SDIST_ENV
    from hub.store import Store
    from tests.tiny_models import make_tiny_base

    monkeypatch.setenv(SDIST_ENV, str(tmp_path / "missing.tar.gz"))
    path = make_tiny_base("qwen2", tmp_path / "tiny-qwen2", Path(base_info.path))
    base = Store(tmp_path / "home", cache=tmp_path / "base-cache").add_base("tiny-qwen2", path)
    engine = create_engine("llamacpp", EngineConfig(
        base=base, max_model_len=128, options={"cache_dir": str(tmp_path / "engine-cache")}))

    async def start() -> None:
        try:
            await engine.start()
        finally:
            await engine.shutdown(drain_timeout_s=0)

    with pytest.raises(Unsupported) as info:
        asyncio.run(start())
    assert "tiny-qwen2" in info.value.message
    assert "gguf=PATH" in info.value.fix and SDIST_ENV in str(info.value)
