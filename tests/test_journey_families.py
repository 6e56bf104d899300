"""The whole journey on a base the user brings, for every family the peft engine serves.

For each family: a tiny checkpoint (`tests.tiny_models`, taught the parity prompts so that q8_0
is judged on confident predictions) is published to the loopback stand-in Hub; then, through
the real CLI, ``loradock hub add-base`` downloads it pinned to its commit, ``loradock train``
runs 2 QLoRA SFT steps with the base's own chat template and registers the adapter, ``loradock
serve --engine peft --base NAME`` answers through the official ``openai`` client exactly what
transformers (eager attention) + PEFT generate greedily in fp32, and ``loradock export gguf
--quant q8_0`` writes a GGUF that llama.cpp loads and that passes the parity gate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.export.test_families_export import base_name, tiny_exportable
from tests.hub.test_add_base import TOKEN, GatedHub, publish
from tests.tiny_models import FAMILY_CONFIGS
from tests.train.train_helpers import write_chat_data, write_recipe

# `make test` walks three families that differ the most (Llama; Gemma 2's norms, soft-caps and
# windows; Phi-3's fused checkpoint) to keep the suite under 25 minutes; the serving, export and
# template tests cover all seven. LORADOCK_JOURNEY_FAMILIES=all (or a comma list) walks more.
_WANTED = os.environ.get("LORADOCK_JOURNEY_FAMILIES", "llama,gemma2,phi3")
JOURNEY_FAMILIES = list(FAMILY_CONFIGS) if _WANTED == "all" else [
    f for f in FAMILY_CONFIGS if f in _WANTED.split(",")]
QUESTION = "Extract: Ada is 36 and lives in Oslo."
MAX_TOKENS = 10


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "loradock.cli", *args], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, (args, result.stderr[-3000:])
    return result


@pytest.fixture
def journey_env(tmp_path, test_cache, base_info, monkeypatch):
    with GatedHub(TOKEN) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN,
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
               "LORADOCK_HOME": str(tmp_path / "home"),
               "LORADOCK_CACHE": str(test_cache / "bases"), "OMP_WAIT_POLICY": "PASSIVE"}
        monkeypatch.setenv("LORADOCK_HOME", env["LORADOCK_HOME"])
        monkeypatch.setenv("LORADOCK_CACHE", env["LORADOCK_CACHE"])
        import huggingface_hub.constants  # the publishing side runs in this process

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield hub, env


def _reference(path: Path, adapter: Path, prompt: list[int], stops: list[int]) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager")
    model = PeftModel.from_pretrained(model, adapter)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                         eos_token_id=stops, pad_token_id=stops[0])
    tokens = out[0, len(prompt):].tolist()
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


@pytest.mark.slow
@pytest.mark.parametrize("family", JOURNEY_FAMILIES)
def test_bring_your_own_base_from_the_hub_through_every_stage(family, tmp_path, journey_env,
                                                              base_info, adapter_factory):
    import openai

    from hub.store import Store
    from serve.chat import Formatter
    from tests.serve.helpers import running_server

    hub, env = journey_env
    name = base_name(family)
    repo = f"acme/{name}"
    commit = publish(hub, repo, tiny_exportable(family, tmp_path / "src", Path(base_info.path)))

    # 1. add-base from the (stand-in) Hub, pinned to its commit.
    added = json.loads(cli("hub", "add-base", name, repo, "--json", env=env).stdout)
    assert added["revision"] == commit and added["model_type"] == family

    # 2. two QLoRA SFT steps with the base's own template, registered.
    data = write_chat_data(tmp_path / "data.jsonl", rows=12)
    recipe = write_recipe(tmp_path / "recipe.yaml", data, tmp_path / "adapter", base=name,
                          max_steps=2, r=4, alpha=8, learning_rate=5e-3)
    cli("train", str(recipe), "--register", "demo", "--no-eval", "--no-progress", env=env)
    store = Store()
    record = store.get("demo")
    assert record.base == name and record.capabilities.rank == 4
    assert (record.path / "chat_template.jinja").read_text() == (
        Path(added["path"]) / "chat_template.jinja").read_text()

    store.register(adapter_factory(seed=3), "elsewhere", base="smollm2")  # another base's

    # 3. served through the official openai client, greedy equal to transformers + PEFT (fp32).
    base = store.base(name)
    formatter = Formatter(base)
    prompt = formatter.encode_chat([{"role": "user", "content": QUESTION}], None)
    tokens = _reference(Path(base.path), record.path, prompt, formatter.stop_token_ids)
    detok = formatter.detokenizer()
    want = "".join(detok.push(t) for t in tokens) + detok.flush()
    with running_server(Path(env["LORADOCK_HOME"]), engine="peft",
                        args=["--base", name, "--base-dtype", "fp32",
                              "--max-model-len", "256"]) as server:
        client = server.client()
        listed = {m.id for m in client.models.list().data}
        assert f"{name}+demo" in listed and "smollm2+elsewhere" not in listed
        with pytest.raises(openai.BadRequestError) as refused:  # 400 naming both bases
            client.chat.completions.create(model=f"{name}+elsewhere", max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
        assert "'smollm2'" in str(refused.value) and f"'{name}'" in str(refused.value)
        reply = client.chat.completions.create(
            model=f"{name}+demo", messages=[{"role": "user", "content": QUESTION}],
            temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == want, family

    # 4. a q8_0 GGUF that llama.cpp loads and that passes the parity gate.
    out = tmp_path / "gguf"
    result = json.loads(cli("export", "gguf", "demo", "--quant", "q8_0", "--out", str(out),
                            "--prompts", "2", "--max-tokens", "8", "--json", env=env).stdout)
    assert result["parity"][0]["passed"], result["parity"]
    assert (out / "demo-v1.q8_0.gguf").is_file()
