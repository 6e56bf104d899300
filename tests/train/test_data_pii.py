"""PII detection per kind, Luhn and IBAN validity, and the drop/redact/keep policies."""

from __future__ import annotations

import json

import pytest

from train.data import NoUsableRows, check_dataset, prepare_dataset, read_split
from train.data.pii import find_pii, iban_valid, luhn_valid, redact

# (text, [(kind, matched text), ...])
DETECT = [
    ("Mail john.doe+x@mail.example.com today.", [("email", "john.doe+x@mail.example.com")]),
    ("Call +1 555 123 4567 now", [("phone", "+1 555 123 4567")]),
    ("Call (555) 123-4567.", [("phone", "(555) 123-4567")]),
    ("Office 020 7946 0958", [("phone", "020 7946 0958")]),
    ("Card 4111 1111 1111 1111 expires", [("credit_card", "4111 1111 1111 1111")]),
    ("Card 5500-0000-0000-0004.", [("credit_card", "5500-0000-0000-0004")]),
    ("Amex 378282246310005", [("credit_card", "378282246310005")]),
    ("Pay DE89 3704 0044 0532 0130 00 today", [("iban", "DE89 3704 0044 0532 0130 00")]),
    ("Pay GB82WEST12345698765432.", [("iban", "GB82WEST12345698765432")]),
    ("Host 192.168.1.20.", [("ipv4", "192.168.1.20")]),
    ("Host 2001:db8::8a2e:370:7334 is up", [("ipv6", "2001:db8::8a2e:370:7334")]),
    (
        "Both a@b.io and 10.0.0.1",
        [("email", "a@b.io"), ("ipv4", "10.0.0.1")],
    ),
    # Not PII: random digits failing Luhn, a bad IBAN check, versions, dates, times, ages.
    ("Order 4111 1111 1111 1112 shipped", []),
    ("Ref 1234567812345678", []),
    ("Pay DE89 3704 0044 0532 0130 02 today", []),  # check digits wrong
    ("Version 1.2.3, on 2024-01-05 at 12:30:45", []),
    ("In 2019 2020 and 2021 we grew", []),
    ("Maria is 34 and lives in Lisbon.", []),
    ("Use std::vector and 999.1.1.1", []),
]


@pytest.mark.parametrize("text,expected", DETECT, ids=[t[:24] for t, _ in DETECT])
def test_detection(text, expected):
    found = [(f.kind, text[f.start : f.end]) for f in find_pii(text)]
    assert found == expected


@pytest.mark.parametrize(
    "digits,valid",
    [
        ("4111111111111111", True),  # Visa test number
        ("5555555555554444", True),  # Mastercard test number
        ("378282246310005", True),  # Amex test number
        ("79927398713", True),  # Luhn's textbook example
        ("4111111111111112", False),
        ("1234567812345678", False),
        ("79927398710", False),
        ("4111 1111", False),  # not only digits
    ],
)
def test_luhn(digits, valid):
    assert luhn_valid(digits) is valid


@pytest.mark.parametrize(
    "iban,valid",
    [
        ("DE89370400440532013000", True),
        ("GB82 WEST 1234 5698 7654 32", True),
        ("FR1420041010050500013M02606", True),
        ("NL91ABNA0417164300", True),
        ("DE89370400440532013001", False),  # check digits do not match
        ("DE8937040044053201300", False),  # wrong length for DE
        ("GB82WEST1234569876543X", False),
        ("XX00123", False),
    ],
)
def test_iban(iban, valid):
    assert iban_valid(iban) is valid


def test_redact_replaces_each_kind_with_its_tag():
    text = "a@b.io, +44 20 7946 0958, 4111111111111111, DE89370400440532013000, 10.1.2.3, fe80::1"
    assert redact(text) == "[EMAIL], [PHONE], [CREDIT_CARD], [IBAN], [IP_ADDRESS], [IP_ADDRESS]"


def _write(tmp_path):
    rows = [
        {"prompt": "Say hi", "completion": "Hi"},
        {"prompt": "Email me at ann@example.com", "completion": "Sure, ann@example.com."},
        {"prompt": "My card is 4111 1111 1111 1111", "completion": "Noted"},
        {"prompt": "Ping 8.8.8.8", "completion": "Pong"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "policy,action,kept_lines",
    [
        ("drop", "dropped", [1]),
        ("redact", "redacted", [1, 2, 3, 4]),
        ("keep", "kept", [1, 2, 3, 4]),
    ],
)
def test_policies(tmp_path, policy, action, kept_lines):
    source = _write(tmp_path)
    report = prepare_dataset(source, tmp_path / "out", pii=policy, splits=(1.0, 0.0, 0.0))
    assert report.pii == {"email": 2, "credit_card": 1, "ipv4": 1}
    assert report.pii_lines == {"email": [2], "credit_card": [3], "ipv4": [4]}
    assert report.pii_policy == policy
    assert [(p.line, p.reason, p.action) for p in report.problems] == [
        (2, "pii", action),
        (3, "pii", action),
        (4, "pii", action),
    ]
    rows = read_split(tmp_path / "out" / "train.jsonl")
    assert [r["line"] for r in rows] == kept_lines
    texts = json.dumps(rows)
    saved = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert saved["pii"] == report.pii and saved["pii_policy"] == policy
    if policy == "redact":
        assert "ann@example.com" not in texts and "4111" not in texts and "8.8.8.8" not in texts
        assert rows[1]["messages"][1]["content"] == "Sure, [EMAIL]."
    if policy == "keep":
        assert "ann@example.com" in texts and "4111 1111 1111 1111" in texts


def test_drop_policy_on_an_all_pii_file_has_no_usable_row(tmp_path):
    source = tmp_path / "d.jsonl"
    source.write_text(json.dumps({"prompt": "Mail x@y.org", "completion": "ok"}) + "\n")
    with pytest.raises(NoUsableRows):
        check_dataset(source, pii="drop")
    assert check_dataset(source, pii="redact").rows_kept == 1


def test_redaction_happens_before_dedup(tmp_path):
    rows = [
        {"prompt": "Write to ann@example.com", "completion": "Done"},
        {"prompt": "Write to bob@example.com", "completion": "Done"},
    ]
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert check_dataset(source, pii="redact").dropped_lines == {"exact_duplicate": [2]}
    assert check_dataset(source, pii="keep").rows_kept == 2
