"""Fixtures shared by the serve tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def formatter(base_info):
    """The real SmolLM2 tokenizer wrapped in `serve.chat.Formatter` (loaded once)."""
    from serve.chat import Formatter

    return Formatter(base_info)


@pytest.fixture(scope="session")
def tokenizer(base_info):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_info.path)


@pytest.fixture(scope="session")
def prompts(tokenizer):
    def chat(text: str) -> list[int]:
        return list(tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
            return_dict=False))

    return [chat("Name three colours of the rainbow."), chat("What is two plus two?")]


@pytest.fixture(scope="module")
def module_store(base_info, tmp_path_factory):
    """One store per test module (registering the base in a fresh index hashes its weights,
    ~2 s, so function-scoped stores would dominate the HTTP tests' run time)."""
    from hub.store import Store
    from tests.conftest import TEST_CACHE

    return Store(tmp_path_factory.mktemp("serve-home"), cache=TEST_CACHE / "bases")


# Engines shared by several modules (the vLLM one) register their shutdown here.
SESSION_CLOSERS: list = []


@pytest.fixture(scope="session", autouse=True)
def _shutdown_shared_engines():
    """Stop shared engines at the end of the session, while thread pools still accept work.

    An ``atexit`` hook runs after concurrent.futures has shut its executors down, so an engine
    stopped there fails with "cannot schedule new futures after shutdown".
    """
    yield
    while SESSION_CLOSERS:
        SESSION_CLOSERS.pop()()
