"""Recipes: typed fields, --set overrides, validation that reports every problem by field."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.errors import InvalidInput
from train.recipe import FIELDS, Recipe, build_recipe, field_help, load_recipe, parse_overrides

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_RECIPES = sorted((REPO / "examples").glob("*/recipe.yaml"))


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                    '{"role": "assistant", "content": "hello"}]}\n')
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_every_field_has_help_and_a_default():
    helps = field_help()
    assert set(helps) == set(FIELDS)
    assert all(text.strip() for text in helps.values())
    Recipe()  # every field has a default


def test_load_resolves_data_relative_to_the_recipe_and_applies_overrides(tmp_path, data_file):
    path = write(tmp_path, "# loradock train recipe.yaml\ndata: data.jsonl\noutput: out/a\nr: 4\n")
    recipe = load_recipe(path, ["r=8", "target_modules=[q_proj, v_proj]", "learning_rate=1e-3",
                                "max_eval_examples=null", "intended_use=JSON: extraction"])
    assert recipe.data == str(data_file.resolve())
    assert recipe.r == 8
    assert recipe.target_modules == ["q_proj", "v_proj"]
    assert recipe.learning_rate == pytest.approx(1e-3)
    assert recipe.max_eval_examples is None
    assert recipe.intended_use == "JSON: extraction"
    assert recipe.output == "out/a"


def test_ints_are_accepted_where_numbers_are_expected(tmp_path, data_file):
    recipe = build_recipe({"data": str(data_file), "output": "o", "epochs": 2, "alpha": 16})
    assert recipe.epochs == 2.0 and isinstance(recipe.epochs, float)
    assert recipe.warmup_ratio == pytest.approx(0.05) and recipe.warmup_steps == 0
    recipe = build_recipe({"data": str(data_file), "output": "o", "warmup": 10})
    assert (recipe.warmup_steps, recipe.warmup_ratio) == (10, 0.0)


def test_validation_collects_every_problem_and_names_each_field(tmp_path):
    path = write(tmp_path, "\n".join([
        "# loradock train recipe.yaml",
        "data: missing.jsonl",
        "method: rlhf",            # not a Literal choice
        "r: 0",                    # must be > 0
        "dropout: 1.5",            # out of range
        "lr: 0.1",                 # unknown field, close to learning_rate
        "batch_size: two",         # wrong type
        "target_modules: some",    # neither a list nor all-linear
        "splits: [0.5, 0.2, 0.2]", # does not sum to 1
        "early_stopping_patience: 2",
        "eval_steps: 10",
        "save_steps: 15",          # not a multiple of eval_steps
        "base: Not/A/Name",
        "warmup: 2.5",
    ]) + "\n")
    with pytest.raises(InvalidInput) as info:
        load_recipe(path, ["pii=maybe", "max_seq_len=8", "oops"])
    text = info.value.message
    expected = {
        "data": "is not a file",
        "output": "is missing",
        "method": "'rlhf' is not one of 'sft', 'dpo'",
        "r": "must be > 0",
        "dropout": "must be in [0, 1)",
        "lr": "did you mean 'learning_rate'",
        "batch_size": "'two' is not an integer",
        "target_modules": "must be 'all-linear'",
        "splits": "summing to 1",
        "save_steps": "multiple of eval_steps",
        "base": "Invalid base name",
        "warmup": "whole number of steps",
        "pii": "'maybe' is not one of 'drop', 'redact', 'keep'",
        "max_seq_len": "must be in [16, 32768]",
    }
    for name, fragment in expected.items():
        lines = [line for line in text.splitlines() if line.strip().startswith(f"{name}:")]
        assert lines, f"no problem reported for field {name!r}:\n{text}"
        assert any(fragment in line for line in lines), (name, lines)
    assert "--set 'oops': expected key=value" in text
    assert f"has {len(expected) + 1} problem(s)" in text
    assert "--set FIELD=VALUE" in info.value.fix


def test_a_field_with_a_wrong_type_is_reported_once(tmp_path):
    with pytest.raises(InvalidInput) as info:
        build_recipe({"data": 5, "output": "o"})
    lines = [line for line in info.value.message.splitlines() if line.strip().startswith("data:")]
    assert len(lines) == 1 and "is not text" in lines[0]


def test_parse_overrides_reads_yaml_values():
    values, problems = parse_overrides(["r=8", "gradient_checkpointing=true", "system_prompt=",
                                        "parent=sft-bot@2"])
    assert values == {"r": 8, "gradient_checkpointing": True, "system_prompt": "",
                      "parent": "sft-bot@2"}
    assert problems == []


def test_parent_must_be_an_adapter_reference(tmp_path, data_file):
    with pytest.raises(InvalidInput) as info:
        build_recipe({"data": str(data_file), "output": "o", "parent": "../etc@x"})
    assert "parent:" in info.value.message
    recipe = build_recipe({"data": str(data_file), "output": "o", "parent": "sft@3",
                           "method": "dpo"})
    assert recipe.parent == "sft@3"


def test_card_mapping_merges_set_overrides(tmp_path, data_file):
    path = write(tmp_path, "# loradock train recipe.yaml\ndata: data.jsonl\noutput: o\n"
                 "card:\n  language: [en]\n  provider: Old\n")
    recipe = load_recipe(path, ["card.provider=ACME, ops@acme.test", "card.release=2025-12-01"])
    assert recipe.card == {"language": ["en"], "provider": "ACME, ops@acme.test",
                           "release": "2025-12-01"}
    assert recipe.card_fields() == recipe.card and recipe.card_fields() is not recipe.card
    assert recipe.to_dict().keys() == FIELDS.keys()
    with pytest.raises(InvalidInput, match="card: .* is not a mapping"):
        load_recipe(path, ["card=[1, 2]"])


def test_there_are_example_recipes():
    names = {p.parent.name for p in EXAMPLE_RECIPES}
    assert {"json-extract", "reply-style", "dpo"} <= names


@pytest.mark.parametrize("path", EXAMPLE_RECIPES, ids=lambda p: p.parent.name)
def test_example_recipe_starts_with_its_command_and_validates(path: Path):
    first = path.read_text().splitlines()[0]
    rel = path.relative_to(REPO).as_posix()
    assert first.startswith(f"# loradock train {rel}"), first
    recipe = load_recipe(path)
    assert Path(recipe.data).is_file()
    assert recipe.intended_use and recipe.out_of_scope_use and recipe.license
