"""Every family the peft engine serves, token-exact against transformers + PEFT in fp32.

For each family a tiny random checkpoint (`tests.tiny_models`) is registered as a base with two
all-linear PEFT adapters, served by a real ``loradock serve`` process, and called with the
official ``openai`` client: the base and both adapters at once (one mixed batch), streamed and
not. Each answer must equal what transformers' eager attention + PEFT generate greedily for the
same prompt, decoded the way the server decodes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serve.runtime import native
from tests.serve.helpers import running_server
from tests.tiny_models import ALL_LINEAR, FAMILY_CONFIGS

MAX_TOKENS = 12
QUESTIONS = ["Name a colour of the sea and explain why.", "Count to five, please, slowly."]


def _reference(path: Path, adapter: Path | None, prompt: list[int], stops: list[int],
               formatter) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                         eos_token_id=stops, pad_token_id=stops[0])
    tokens = out[0, len(prompt):].tolist()
    for i, token in enumerate(tokens):
        if token in stops:
            tokens = tokens[:i]
            break
    detok = formatter.detokenizer()
    return "".join(detok.push(t) for t in tokens) + detok.flush()


def _ask(client, model: str, question: str, stream: bool) -> str:
    messages = [{"role": "user", "content": question}]
    if not stream:
        reply = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                               max_tokens=MAX_TOKENS)
        return reply.choices[0].message.content or ""
    chunks = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                            max_tokens=MAX_TOKENS, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# Every family through the native kernels (what `auto` picks on the machines measured so far),
# and one through torch's ops (where the measurement prefers them, or no compiler is found).
KERNEL_CASES = [(family, "native") for family in FAMILY_CONFIGS] + [("llama", "torch")]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "kernels"), KERNEL_CASES,
                         ids=[f"{family}-{kernels}" for family, kernels in KERNEL_CASES])
def test_family_is_served_token_exact_in_a_mixed_batch(family, kernels, tmp_path, base_info):
    import torch
    from transformers import AutoModelForCausalLM

    from hub.store import Store
    from serve.chat import Formatter
    from tests.conftest import TEST_CACHE
    from tests.factories import make_lora
    from tests.tiny_models import make_tiny_base

    home = tmp_path / "home"
    store = Store(home, cache=TEST_CACHE / "bases")
    name = "tiny-" + family.replace("_", "-")
    path = make_tiny_base(family, tmp_path / family, Path(base_info.path))
    base = store.add_base(name, path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    adapters = {}
    for i in range(2):
        folder = make_lora(model, tmp_path / f"a{i}", r=8, targets=ALL_LINEAR[family],
                           seed=i + 1, scale=0.3)
        adapters[f"{name}+a{i}"] = folder
        store.register(folder, f"a{i}", base=name)
    formatter = Formatter(base)
    want = {}
    for model_name, folder in [(name, None), *adapters.items()]:
        for question in QUESTIONS:
            prompt = formatter.encode_chat([{"role": "user", "content": question}], None)
            want[(model_name, question)] = _reference(path, folder, prompt,
                                                      formatter.stop_token_ids, formatter)
    assert len(set(want.values())) > 2, "the adapters must change the answers"
    if kernels == "native" and native.library() is None:
        pytest.skip("no C compiler here: the native kernels cannot be built")
    options = {"native": ["lora_kernel=native", "attention_kernel=native"],
               "torch": ["lora_kernel=torch", "attention_kernel=sdpa"]}[kernels]
    with running_server(home, engine="peft", args=[
            "--base", name, "--base-dtype", "fp32", "--max-model-len", "256",
            *(arg for option in options for arg in ("--engine-option", option))]) as server:
        client = server.client()
        jobs = [(m, q, stream) for (m, q) in want for stream in (False, True)]
        with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: one mixed batch
            got = list(pool.map(lambda job: _ask(client, *job), jobs))
    for (model_name, question, stream), text in zip(jobs, got, strict=True):
        assert text == want[(model_name, question)], (family, model_name, question, stream)
