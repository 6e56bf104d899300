"""Personal data in text: detectors registered by kind, validity checks, and redaction.

Kinds (`DETECTORS`, tried in this order; a later kind never matches inside an earlier match):

- ``email``: ``local@domain.tld``.
- ``iban``: country code, check digits and 11-30 letters/digits (spaces allowed every 4);
  must pass the ISO 13616 mod-97 check, with the country's length where it is known.
- ``credit_card``: 13-19 digits (single spaces or dashes allowed), first digit 2-6, and a valid
  Luhn checksum, so random digit strings are mostly not flagged.
- ``ipv6`` / ``ipv4``: addresses that Python's `ipaddress` accepts.
- ``phone``: 9-15 digits written as a phone number: a leading ``+`` or groups separated by
  spaces, dots, dashes or parentheses (dates such as 2024-01-05 have too few digits).

Redaction replaces each finding with its tag (``[EMAIL]``, ``[PHONE]``, ...).

Where the job ends: this module finds and replaces spans in one string; what to do with a row
(drop, redact, keep) is decided by `train.data.pipeline`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

PiiPolicy = Literal["drop", "redact", "keep"]
PII_POLICIES: tuple[str, ...] = ("drop", "redact", "keep")

# ISO 13616 lengths for common countries; others only need the mod-97 check.
IBAN_LENGTHS = {
    "AT": 20,
    "BE": 16,
    "CH": 21,
    "CZ": 24,
    "DE": 22,
    "DK": 18,
    "ES": 24,
    "FI": 18,
    "FR": 27,
    "GB": 22,
    "GR": 27,
    "HU": 28,
    "IE": 22,
    "IT": 27,
    "LU": 20,
    "NL": 18,
    "NO": 15,
    "PL": 28,
    "PT": 25,
    "RO": 24,
    "SE": 24,
    "SK": 24,
}


@dataclass(frozen=True)
class Finding:
    """One span of personal data: ``text[start:end]`` is of ``kind``."""

    kind: str
    start: int
    end: int


def luhn_valid(digits: str) -> bool:
    """Return True when ``digits`` (only 0-9) passes the Luhn checksum."""
    if not digits.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """Return True when ``iban`` (spaces allowed) passes the mod-97 check and known length."""
    compact = iban.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", compact):
        return False
    expected = IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,8}\b")
_CARD = re.compile(r"(?<![\d-])[2-6]\d{3}(?:[ -]?\d){9,15}(?![\d-])")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d[\d ().-]{6,20}\d|\(?\d{2,5}\)?(?:[ .-]\(?\d{2,5}\)?){1,5})"
    r"(?![\w])"
)


def _iban_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for match in _IBAN.finditer(text):
        raw = match.group()
        expected = IBAN_LENGTHS.get(raw[:2])
        if expected is not None:
            # Trim trailing groups swallowed from the following text to the country's length.
            kept, count = 0, 0
            while kept < len(raw) and count < expected:
                count += raw[kept] != " "
                kept += 1
            raw = raw[:kept]
        if iban_valid(raw):
            spans.append((match.start(), match.start() + len(raw)))
    return spans


def _card_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for match in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            spans.append(match.span())
    return spans


def _ip_spans(pattern: re.Pattern[str], version: int) -> Callable[[str], list[tuple[int, int]]]:
    def find(text: str) -> list[tuple[int, int]]:
        spans = []
        for match in pattern.finditer(text):
            candidate = match.group()
            if version == 6 and sum(c not in ":" for c in candidate) < 3:
                continue
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                continue
            spans.append(match.span())
        return spans

    return find


def _looks_like_phone(raw: str) -> bool:
    digits = sum(c.isdigit() for c in raw)
    if raw.startswith("+"):
        return 8 <= digits <= 15
    if any(c in raw for c in "()-."):
        return 9 <= digits <= 15
    # Only spaces: numbers in running text ("in 2019 2020 2021") look the same, so ask for a
    # national trunk prefix (a leading 0) and a national number's length.
    return raw.startswith("0") and 10 <= digits <= 11


def _phone_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _PHONE.finditer(text) if _looks_like_phone(m.group())]


def _regex_spans(pattern: re.Pattern[str]) -> Callable[[str], list[tuple[int, int]]]:
    return lambda text: [m.span() for m in pattern.finditer(text)]


@dataclass(frozen=True)
class Detector:
    """A kind of personal data: how to find it and what replaces it."""

    kind: str
    tag: str
    find: Callable[[str], list[tuple[int, int]]]


DETECTORS: dict[str, Detector] = {
    d.kind: d
    for d in (
        Detector("email", "[EMAIL]", _regex_spans(_EMAIL)),
        Detector("iban", "[IBAN]", _iban_spans),
        Detector("credit_card", "[CREDIT_CARD]", _card_spans),
        Detector("ipv6", "[IP_ADDRESS]", _ip_spans(_IPV6, 6)),
        Detector("ipv4", "[IP_ADDRESS]", _ip_spans(_IPV4, 4)),
        Detector("phone", "[PHONE]", _phone_spans),
    )
}


def find_pii(text: str) -> list[Finding]:
    """Return non-overlapping findings in ``text``, in text order."""
    taken: list[Finding] = []
    for detector in DETECTORS.values():
        for start, end in detector.find(text):
            if all(end <= f.start or start >= f.end for f in taken):
                taken.append(Finding(detector.kind, start, end))
    return sorted(taken, key=lambda f: f.start)


def redact(text: str, findings: list[Finding] | None = None) -> str:
    """Return ``text`` with every finding replaced by its kind's tag."""
    findings = find_pii(text) if findings is None else findings
    out, position = [], 0
    for finding in sorted(findings, key=lambda f: f.start):
        out.append(text[position : finding.start])
        out.append(DETECTORS[finding.kind].tag)
        position = finding.end
    out.append(text[position:])
    return "".join(out)
