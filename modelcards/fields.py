"""The recipe's ``card:`` fields: what a run cannot know and the card still needs.

Train copies the recipe's ``card:`` mapping verbatim into the manifest's ``extra["card"]``; this
module is the one place that names, documents and validates those keys. A required field that is
missing becomes an item of the card's "To complete before publishing" list (the card is then a
draft); it is never filled with a placeholder.

Where the job ends: this module parses and checks the mapping; using the values is `card` and
`euaiact`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from hub.errors import InvalidInput

DataSource = Literal[
    "public_datasets", "private_datasets", "scraped", "user_data", "synthetic", "other"
]
DATA_SOURCE_HEADINGS: dict[str, str] = {
    "public_datasets": "2.1 Publicly available datasets",
    "private_datasets": "2.2 Private non-publicly available datasets obtained from third parties",
    "scraped": "2.3 Data crawled and scraped from online sources",
    "user_data": "2.4 User data",
    "synthetic": "2.5 Synthetic data",
    "other": "2.6 Other sources of data",
}

_NUMBER_KEYS = {"base_training_flops", "device_power_w", "energy_kwh"}


@dataclass
class CardFields:
    """Recipe ``card:`` fields (all optional to train; the card lists what is missing).

    Attributes:
        name: Model name on the card (default: the adapter's name).
        language: ISO 639 code(s) of the training data, e.g. ``en`` or ``[en, fr]``. Required.
        datasets: Hugging Face dataset ids the data came from (metadata ``datasets``), if any.
        tags: Extra metadata tags.
        provider: Who places the adapter on the market: name and contact. Required (Art. 53
            summary 1.1).
        release: Date of release and method of distribution, e.g. ``2025-12-01, Hugging Face
            Hub``. Required (Annex XI 1(c)).
        copyright_policy: The provider's policy to comply with EU copyright law, or a link to it.
            Required (Art. 53(1)(c)).
        data_sources: ``{category: description}`` of where the training rows came from;
            categories: public_datasets, private_datasets, scraped, user_data, synthetic, other.
            Categories left out are declared unused. Required (Art. 53(1)(d) summary section 2).
        rights_reservations: How text-and-data-mining opt-outs were respected when the data was
            collected. Required (summary 3.1).
        illegal_content: Measures taken to remove illegal content from the data. Required
            (summary 3.2).
        known_biases: Known biases and gaps of the training data, or how it was checked.
            Required (Annex XI 2(c)).
        limitations: Extra limitations to list beside the generic ones.
        base_training_flops: Training compute of the base model in FLOP, when its provider
            published it (else estimated as 6 x parameters x training tokens).
        device_power_w: Average power draw of the training device in watts (energy estimate).
        energy_kwh: Measured training energy in kWh (replaces the estimate).
    """

    name: str = ""
    language: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    provider: str = ""
    release: str = ""
    copyright_policy: str = ""
    data_sources: dict[str, str] = field(default_factory=dict)
    rights_reservations: str = ""
    illegal_content: str = ""
    known_biases: str = ""
    limitations: str = ""
    base_training_flops: float | None = None
    device_power_w: float | None = None
    energy_kwh: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CardFields:
        """Parse ``extra["card"]``; unknown keys and bad types are reported together.

        Raises:
            InvalidInput: Listing every bad key (``card.KEY`` as the recipe spells it).
        """
        data = dict(data or {})
        problems: list[str] = []
        known = {f.name for f in fields(cls)}
        for key in sorted(set(data) - known):
            problems.append(f"unknown field card.{key} (known: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for key in ("language", "datasets", "tags"):
            if key in data:
                raw = data[key]
                raw = [raw] if isinstance(raw, str) else raw
                if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
                    problems.append(f"card.{key} must be a string or a list of strings")
                else:
                    values[key] = [v for v in raw if v.strip()]
        for key in sorted(_NUMBER_KEYS):
            if data.get(key) is not None:
                try:
                    number = float(data[key])
                except (TypeError, ValueError):
                    number = -1.0
                if number <= 0:
                    problems.append(f"card.{key} must be a positive number, got {data[key]!r}")
                else:
                    values[key] = number
        if "data_sources" in data:
            sources = data["data_sources"]
            if not isinstance(sources, dict):
                problems.append("card.data_sources must map a category to a description")
            else:
                for category in sources:
                    if category not in DATA_SOURCE_HEADINGS:
                        problems.append(
                            f"card.data_sources has unknown category {category!r} "
                            f"(use {', '.join(DATA_SOURCE_HEADINGS)})"
                        )
                values["data_sources"] = {str(k): str(v) for k, v in sources.items()}
        text_keys = known - {"language", "datasets", "tags", "data_sources"} - _NUMBER_KEYS
        for key in sorted(text_keys):
            if key in data and data[key] is not None:
                if not isinstance(data[key], str):
                    problems.append(f"card.{key} must be text, got {type(data[key]).__name__}")
                else:
                    values[key] = data[key].strip()
        if problems:
            raise InvalidInput(
                "Bad card fields: " + "; ".join(problems),
                fix="Fix the recipe's card: section (see modelcards/fields.py for each field).",
                param="card",
            )
        return cls(**values)
