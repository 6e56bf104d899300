"""The draft path: unknowns are listed, the card is marked draft, and ``hub push`` refuses it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hub import remote
from hub.errors import DraftCard
from modelcards import card_is_draft, draft_reasons, write_card
from tests.modelcards.conftest import FULL_CARD, make_manifest


def test_complete_card_is_not_a_draft(card_folder: Path, base_info) -> None:
    make_manifest(base_info).write(card_folder)
    result = write_card(card_folder, base_info)
    assert result.draft is False and result.to_complete == []
    assert card_is_draft(result.path) is False
    assert remote.card_is_draft(result.path) is False  # the hub's own check agrees
    text = result.path.read_text()
    assert "Nothing: every section was filled" in text and "**To complete**" not in text


def test_missing_fields_make_a_draft_that_lists_them(card_folder: Path, base_info) -> None:
    card = {k: v for k, v in FULL_CARD.items() if k not in ("copyright_policy", "provider")}
    make_manifest(base_info, card=card, license="").write(card_folder)
    result = write_card(card_folder, base_info)
    assert result.draft is True
    joined = "\n".join(result.to_complete)
    for field in ("card.copyright_policy", "card.provider", "license in the recipe"):
        assert field in joined
    assert len(result.to_complete) == len(set(result.to_complete))
    assert result.metadata["draft"] is True and "draft" in result.metadata["tags"]
    assert "license" not in result.metadata  # no placeholder licence in the metadata
    assert card_is_draft(result.path) and remote.card_is_draft(result.path)
    reasons = draft_reasons(result.path)
    assert any("card.copyright_policy" in r for r in reasons)
    text = result.path.read_text()
    assert "**To complete**: card.copyright_policy" in text  # visible where it belongs


def test_plain_peft_folder_gets_a_draft_card(adapter_factory, base_info, tmp_path: Path) -> None:
    folder = tmp_path / "plain-lora"
    shutil.copytree(adapter_factory(seed=1), folder)
    result = write_card(folder, base_info)
    assert result.draft
    joined = "\n".join(result.to_complete)
    assert "no loradock.json" in joined and "loradock eval" in joined
    assert "intended_use" in joined and "card.language" in joined


@pytest.mark.parametrize(
    ("text", "draft"),
    [
        ("---\ndraft: false\n---\n# Card\n", False),
        ("---\ndraft: true\n---\n# Card\n", True),
        ("---\nlicense: mit\n---\n# Someone else's card\n", True),  # not checked by loradock
        ("# No metadata at all\n", True),
        ("---\ndraft: [unclosed\n---\n", True),
        ("---\ndraft: false\ntags: [draft]\n---\n", True),
        ("---\ndraft: false\n---\n## To complete before publishing\n\n- card.provider\n", True),
        ("---\ndraft: false\n---\n## To complete before publishing\n\nNothing: done.\n", False),
    ],
)
def test_card_is_draft_table(tmp_path: Path, text: str, draft: bool) -> None:
    path = tmp_path / "README.md"
    path.write_text(text)
    assert card_is_draft(path) is draft


def test_missing_card_counts_as_draft(tmp_path: Path) -> None:
    assert card_is_draft(tmp_path / "README.md") is True


def test_hub_push_refuses_a_draft_card(card_folder: Path, base_info, store) -> None:
    card = {k: v for k, v in FULL_CARD.items() if k != "copyright_policy"}
    make_manifest(base_info, card=card).write(card_folder)
    assert write_card(card_folder, base_info).draft
    record = store.register(card_folder, "json-extract")
    with pytest.raises(DraftCard):
        remote.push(store, record, "example-org/json-extract")
