"""`loradock card`: a hub adapter's card goes to --out; --dir rewrites an unregistered folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.manifest import CARD_FILE
from loradock.cli import main
from modelcards import card_is_draft
from tests.modelcards.conftest import make_manifest


def _run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_card_for_a_registered_adapter_goes_to_out(
    card_folder: Path, base_info, store, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make_manifest(base_info).write(card_folder)
    record = store.register(card_folder, "json-extract")
    before = {p.name: p.read_bytes() for p in record.path.iterdir()}
    out = tmp_path / "card-out"
    assert _run(["card", "json-extract@1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"card: {out / CARD_FILE}" in printed and "complete: ready to publish" in printed
    text = (out / CARD_FILE).read_text()
    assert "`json-extract@1`" in text and 'model="smollm2+json-extract"' in text
    assert not card_is_draft(out / CARD_FILE)
    assert {p.name: p.read_bytes() for p in record.path.iterdir()} == before  # store untouched


def test_card_dir_lists_items_to_complete(
    card_folder: Path, base_info, store, capsys: pytest.CaptureFixture
) -> None:
    make_manifest(base_info, card={"language": "en"}).write(card_folder)
    assert _run(["card", "--dir", str(card_folder)]) == 0
    printed = capsys.readouterr().out
    assert "draft:" in printed and "card.copyright_policy" in printed
    assert card_is_draft(card_folder / CARD_FILE)


def test_card_needs_exactly_one_target(store, capsys: pytest.CaptureFixture) -> None:
    assert _run(["card"]) != 0
    assert "error:" in capsys.readouterr().err
