"""The whole journey on a base the user brings, for every family the peft engine serves.

For each family: a tiny checkpoint under the family's own chat format (`tests.tiny_models`;
Llama-3, Mistral, Qwen2.5 and Qwen3 ChatML, Gemma 2 without a system role, Gemma 3, Phi-3),
taught the parity prompts so that q8_0 is judged on confident predictions, is published to the
loopback stand-in Hub; then, through the real CLI:

- ``loradock hub add-base`` downloads it pinned to its commit and records its licence;
- ``loradock train`` runs 2 QLoRA SFT steps with the base's own template and a recipe system
  prompt (folded into the user turn where the template refuses one: Gemma 2), evaluates, writes
  the card (compute from this architecture's parameter count, the base's licence carried over)
  and registers the adapter; a 2-step ``method: dpo`` run trains on the same base;
- ``loradock serve --engine peft --base NAME`` answers through the official ``openai`` client
  exactly what transformers (eager attention) + PEFT generate greedily in fp32 on the prompt the
  server renders (the recorded system prompt applied as training applied it);
- ``loradock export merged --dtype fp16`` and ``export gguf --quant q8_0`` pass the parity gate,
  the GGUF loaded by llama.cpp.

Cost: the CLI commands that import torch run in this process (typer's runner: one interpreter
start saved per command, ~8 s each here); add-base (no torch) and the server run as processes.
The taught base is shared with `tests.export.test_families_export`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.export.test_families_export import (
    LLAMA_CPP_ARCH,
    PARITY,
    _meta,
    base_name,
    shared_exportable,
)
from tests.hub.test_add_base import TOKEN, GatedHub, publish
from tests.tiny_models import CHAT_FORMATS, FAMILY_CONFIGS
from tests.train.train_helpers import write_chat_data, write_preference_data, write_recipe

# LORADOCK_JOURNEY_FAMILIES (a comma list) walks fewer, e.g. while working on one family.
_WANTED = os.environ.get("LORADOCK_JOURNEY_FAMILIES", "all")
JOURNEY_FAMILIES = list(FAMILY_CONFIGS) if _WANTED == "all" else [
    f for f in FAMILY_CONFIGS if f in _WANTED.split(",")]
QUESTION = "Extract: Ada is 36 and lives in Oslo."
SYSTEM = "Answer with one JSON object."
MAX_TOKENS = 10
# Parity on the prompts the base was taught (a flip among 16 tokens is one in 16; among 32,
# one in 32: near-ties left after the two training steps must not decide the gate).
PROMPTS = str(PARITY.prompts)


def cli_process(*args: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "loradock.cli", *args], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, (args, result.stderr[-3000:])
    return result


def cli(*args: str) -> str:
    """Run ``loradock ARGS`` in this process (the environment is the test's); return stdout."""
    import torch
    from typer.testing import CliRunner

    from loradock.cli import app

    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        torch.set_num_threads(threads)  # a recipe's `threads:` must not outlive its command
    assert result.exit_code == 0, (args, result.output[-3000:], result.exception)
    return result.stdout


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


def _train(tmp_path: Path, name: str) -> None:
    """2 SFT steps (eval, card, registered as demo) and 2 DPO steps on base ``name``."""
    small = {"base": name, "max_steps": 2, "r": 4, "alpha": 8, "learning_rate": 5e-3,
             "max_seq_len": 96, "eval_steps": 0, "save_steps": 0}
    data = write_chat_data(tmp_path / "data.jsonl", rows=10)
    recipe = write_recipe(tmp_path / "recipe.yaml", data, tmp_path / "adapter",
                          system_prompt=SYSTEM, max_eval_examples=1, max_new_tokens=4,
                          eval_prompts=[QUESTION], **small)
    cli("train", str(recipe), "--register", "demo", "--no-progress")
    pairs = write_preference_data(tmp_path / "pairs.jsonl", rows=10)
    dpo = write_recipe(tmp_path / "dpo.yaml", pairs, tmp_path / "dpo", method="dpo", **small)
    cli("train", str(dpo), "--no-eval", "--no-progress")


@pytest.mark.slow
@pytest.mark.parametrize("family", JOURNEY_FAMILIES)
def test_bring_your_own_base_from_the_hub_through_every_stage(family, tmp_path, tmp_path_factory,
                                                              journey_env, base_info,
                                                              adapter_factory):
    import openai

    from hub.manifest import AdapterManifest
    from hub.store import Store
    from serve.chat import Formatter
    from tests.serve.helpers import running_server

    hub, env = journey_env
    name = base_name(family)
    repo = f"acme/{name}"
    commit = publish(hub, repo, shared_exportable(family, tmp_path_factory, Path(base_info.path)))

    # 1. add-base from the (stand-in) Hub, pinned to its commit, its licence recorded.
    added = json.loads(cli_process("hub", "add-base", name, repo, "--json", env=env).stdout)
    assert added["revision"] == commit and added["model_type"] == family
    assert added["license"] == CHAT_FORMATS[family].license

    # 2. QLoRA SFT with the base's own template (+ eval, card, register) and DPO, 2 steps each.
    _train(tmp_path, name)
    store = Store()
    record = store.get("demo")
    base = store.base(name)
    assert record.base == name and record.capabilities.rank == 4
    template = json.loads((Path(base.path) / "tokenizer_config.json").read_text())
    assert (record.path / "chat_template.jinja").read_text() == template["chat_template"]
    manifest = record.manifest
    compute = manifest.compute
    lora = compute["trainable_parameters"]  # the compute estimate counts this architecture
    assert compute["total_parameters"] == base.num_parameters + lora, compute
    assert compute["estimated_flops"] == 6 * compute["total_parameters"] * compute["tokens_seen"]
    assert manifest.license == CHAT_FORMATS[family].license  # the base's, carried over
    card = (record.path / "README.md").read_text()
    assert f"license: {CHAT_FORMATS[family].license}" in card
    assert f"{base.num_parameters:,} parameters" in card
    evaluated = json.loads((record.path / "eval.json").read_text())
    assert evaluated["systems"]["adapter"]["scored_tokens"] > 0 and evaluated["examples"]
    # Assistant-only loss wherever markers can be derived; Qwen3's template prints content
    # through a variable, so its run falls back to loss on every token (recorded).
    assert manifest.hyperparameters["assistant_only_loss"] is (family != "qwen3")
    dpo = AdapterManifest.read(tmp_path / "dpo")
    assert dpo.method == "dpo" and dpo.compute["steps"] == 2
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()

    store.register(adapter_factory(seed=3), "elsewhere", base="smollm2")  # another base's

    # 3. served through the official openai client, greedy equal to transformers + PEFT (fp32)
    # on the prompt the server renders (the recorded system prompt, folded where refused).
    formatter = Formatter(base)
    messages = [{"role": "user", "content": QUESTION}]
    prompt_text = formatter.render_chat(messages, record)
    assert SYSTEM in prompt_text
    prompt = formatter.encode_chat(messages, record)
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
            model=f"{name}+demo", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == want, family

    # 4. a 16-bit merge and a q8_0 GGUF (llama.cpp) that pass the parity gate.
    merged = json.loads(cli("export", "merged", "demo", "--out", str(tmp_path / "merged"),
                            "--dtype", "fp16", "--no-drift", "--prompts", PROMPTS,
                            "--max-tokens", "8", "--json"))
    assert merged["parity"][0]["passed"], merged["parity"]
    out = tmp_path / "gguf"
    result = json.loads(cli("export", "gguf", "demo", "--quant", "q8_0", "--out", str(out),
                            "--prompts", PROMPTS, "--max-tokens", "8", "--json"))
    assert result["parity"][0]["passed"], result["parity"]
    assert not result["parity"][0].get("tokenizer_mismatches"), result["parity"]
    meta = _meta(out / "demo-v1.q8_0.gguf")
    assert meta["arch"] == LLAMA_CPP_ARCH[family] and "Q8_0" in meta["types"]
