"""The EU AI Act role verdict on both sides of the one-third line, and its compute sources."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hub.errors import InvalidInput
from modelcards import write_card
from modelcards.euaiact import ONE_THIRD, role_verdict
from modelcards.fields import CardFields
from tests.modelcards.conftest import FULL_CARD, make_manifest


@pytest.mark.parametrize(
    ("modification", "base", "provider"),
    [
        (9.96e13, 1.61e21, False),  # a LoRA run: ~1e-7 of the base
        (1.0e20, 3.0e20, False),  # exactly one third is not "more than one third"
        (1.0001e20, 3.0e20, True),
        (2.0e21, 3.0e21, True),
        (5.0e21, 1.0e21, True),
    ],
)
def test_role_verdict_table(modification: float, base: float, provider: bool) -> None:
    role = role_verdict(modification, "m", base, "b")
    assert role.ratio == pytest.approx(modification / base)
    assert role.threshold == ONE_THIRD
    assert role.provider is provider
    expected = "is presumed to be the provider" if provider else "is not presumed to be"
    assert expected in role.sentence
    assert f"{modification / base:.2e} times" in role.sentence


def test_role_unknown_when_a_figure_is_missing() -> None:
    role = role_verdict(None, "unknown", 1e21, "b")
    assert role.provider is None and role.ratio is None
    assert "cannot be computed" in role.sentence


@pytest.mark.parametrize(("base_flops", "provider"), [(2.5e14, True), (3.5e14, False)])
def test_card_role_on_both_sides_of_one_third(
    card_folder: Path, base_info, base_flops: float, provider: bool
) -> None:
    # estimated_flops is 9.96e13: 9.96e13 / 2.5e14 = 0.398 > 1/3; / 3.5e14 = 0.285 < 1/3.
    card = {**FULL_CARD, "base_training_flops": base_flops}
    make_manifest(base_info, card=card).write(card_folder)
    result = write_card(card_folder, base_info)
    assert result.metadata["loradock"]["eu_ai_act_provider"] is provider
    assert result.metadata["loradock"]["compute_ratio"] == pytest.approx(9.96e13 / base_flops)
    text = result.path.read_text()
    assert result.role_sentence in text
    assert "card.base_training_flops (recipe)" in text
    if provider:
        assert "above the one-third criterion" in result.role_sentence
        assert "Recital 109" in result.role_sentence
    else:
        assert "below the one-third criterion" in result.role_sentence


def test_modification_compute_falls_back_to_6_n_tokens_seen(card_folder: Path, base_info) -> None:
    manifest = make_manifest(base_info)
    manifest.compute = {"device": "cpu", "wall_time_s": 100.0, "tokens_seen": 5000}
    manifest.write(card_folder)
    result = write_card(card_folder, base_info)
    expected = 6.0 * base_info.num_parameters * 5000
    assert f"{expected:.2e} FLOP" in result.role_sentence
    assert "an upper bound for LoRA" in result.path.read_text()


def test_unknown_base_compute_is_listed_to_complete(card_folder: Path, base_info) -> None:
    unknown = dataclasses.replace(base_info, training_tokens=0)
    make_manifest(base_info).write(card_folder)
    result = write_card(card_folder, unknown)
    assert result.draft
    assert any("card.base_training_flops" in item for item in result.to_complete)
    assert "cannot be computed" in result.role_sentence


def test_card_fields_report_every_problem_at_once() -> None:
    with pytest.raises(InvalidInput) as err:
        CardFields.from_dict({
            "langauge": "en", "base_training_flops": "lots", "tags": [1],
            "data_sources": {"web": "x"},
        })
    message = err.value.message
    for part in ("card.langauge", "card.base_training_flops", "card.tags", "'web'"):
        assert part in message
    assert CardFields.from_dict({"language": "en"}).language == ["en"]
