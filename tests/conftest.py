"""Session fixtures: the real embedded base (converted once, cached across runs) and real adapters.

The converted SmolLM2 folder lives in ``$LORADOCK_TEST_CACHE`` (default ``.cache/test`` in the
repo), so only the first run pays the ~30 s conversion. Each test gets its own empty store.
"""

from __future__ import annotations

import os
from pathlib import Path

# Two busy cores: spin-waiting torch threads made work 3-10x slower here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from hub.bases import BaseInfo  # noqa: E402
from hub.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TEST_CACHE = Path(os.environ.get("LORADOCK_TEST_CACHE", REPO / ".cache" / "test"))


@pytest.fixture(scope="session")
def test_cache() -> Path:
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    return TEST_CACHE


@pytest.fixture(scope="session")
def base_info(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> BaseInfo:
    """The embedded SmolLM2 base, converted once into the test cache."""
    store = Store(tmp_path_factory.mktemp("base-home"), cache=test_cache / "bases")
    return store.base("smollm2")


@pytest.fixture
def home(tmp_path: Path, test_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty LORADOCK_HOME for this test, sharing the converted base cache."""
    path = tmp_path / "home"
    monkeypatch.setenv("LORADOCK_HOME", str(path))
    monkeypatch.setenv("LORADOCK_CACHE", str(test_cache / "bases"))
    return path


@pytest.fixture
def store(home: Path, base_info: BaseInfo) -> Store:
    """An empty store (LORADOCK_HOME set) whose embedded base is already converted."""
    return Store(home)


@pytest.fixture(scope="session")
def base_model(base_info: BaseInfo):
    """The real SmolLM2 loaded in fp32 with transformers (shared; do not modify)."""
    from tests.factories import load_base_model

    return load_base_model(base_info)


@pytest.fixture(scope="session")
def adapter_factory(base_model, tmp_path_factory: pytest.TempPathFactory):
    """Make (and cache per session) real PEFT LoRA folders: ``adapter_factory(seed=1, r=8)``."""
    from tests.factories import make_lora

    root = tmp_path_factory.mktemp("adapters")
    made: dict[tuple, Path] = {}

    def factory(**kwargs) -> Path:
        key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in made:
            made[key] = make_lora(base_model, root / f"lora-{len(made)}", **kwargs)
        return made[key]

    return factory
