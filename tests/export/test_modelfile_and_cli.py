"""Modelfile contents, option validation and the CLI surface (no model is loaded here)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from export.config import GgufOptions, ParityOptions
from export.ollama import ADAPTER_NOTE, build_modelfile, ollama_commands, recipe_system_prompt
from export.templates import translate
from hub.errors import InvalidInput, NotFound, Unsupported
from hub.manifest import AdapterManifest
from loradock.cli_export import app
from tests.export.test_templates import CHATML, GEMMA_NO_SYSTEM


def test_modelfile_has_every_directive() -> None:
    text = build_modelfile(model_file="m.gguf", translation=translate(CHATML),
                           license="Apache-2.0", system="Answer in JSON.", header=["hello"])
    lines = text.splitlines()
    assert lines[0] == "# hello"
    assert "FROM ./m.gguf" in lines
    assert 'PARAMETER stop "<|im_start|>"' in lines and 'PARAMETER stop "<|im_end|>"' in lines
    assert 'SYSTEM """Answer in JSON."""' in lines
    assert 'LICENSE """Apache-2.0"""' in lines
    assert text.count('TEMPLATE """') == 1 and "ADAPTER" not in text


def test_adapter_only_modelfile_says_support_is_narrower() -> None:
    text = build_modelfile(model_file="base.gguf", adapter_file="a.gguf",
                           translation=translate(CHATML), license="x")
    assert "ADAPTER ./a.gguf" in text and ADAPTER_NOTE in text


def test_system_is_left_out_when_the_template_refuses_it() -> None:
    translation = translate(GEMMA_NO_SYSTEM, bos_token="<bos>", add_bos=True)
    text = build_modelfile(model_file="m.gguf", translation=translation, license="x",
                           system="Be brief.")
    assert "SYSTEM" not in text


def test_triple_quotes_cannot_be_written() -> None:
    with pytest.raises(Unsupported, match="SYSTEM"):
        build_modelfile(model_file="m.gguf", translation=translate(CHATML), license="x",
                        system='say """hi"""')


def test_recipe_system_prompt_comes_from_the_manifest() -> None:
    assert recipe_system_prompt(None) is None
    manifest = AdapterManifest(base={"name": "smollm2"}, extra={"system_prompt": "Be kind."})
    assert recipe_system_prompt(manifest) == "Be kind."
    manifest = AdapterManifest(base={"name": "smollm2"}, hyperparameters={"system": "Terse."})
    assert recipe_system_prompt(manifest) == "Terse."


def test_commands_are_exact(tmp_path) -> None:
    assert ollama_commands(tmp_path, "demo:v2") == [
        f"cd {tmp_path} && ollama create demo:v2 -f Modelfile", "ollama run demo:v2"]


def test_options_name_the_bad_flag() -> None:
    with pytest.raises(InvalidInput, match="--quant 'q5'"):
        GgufOptions(quant="q5").validate()  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="--prompts"):
        ParityOptions(prompts=0).validate()
    assert ParityOptions().threshold_for("q4_k_m") == 0.75
    assert ParityOptions(threshold=0.5).threshold_for("f16") == 0.5


@pytest.mark.parametrize("command", ["merged", "gguf", "lora-gguf", "ollama"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Example: loradock export" in result.output
    assert "--out" in result.output


def test_unknown_adapter_is_a_not_found_error(home, tmp_path) -> None:
    result = CliRunner().invoke(app, ["gguf", "nope", "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, NotFound)
    assert not (tmp_path / "o").exists()
