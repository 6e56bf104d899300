"""Everything a card states, read once from the adapter folder and the base description.

Sources, in the order the card trusts them: ``loradock.json`` (the manifest train wrote),
``eval.json`` (train/eval), ``adapter_config.json`` and the safetensors header (PEFT's files), the
recipe's ``card:`` fields (inside the manifest) and `hub.bases.BaseInfo`. Nothing here guesses:
an absent source stays None and the card lists it under "To complete before publishing".

Where the job ends: this module reads files; deciding what is missing is `card` and `euaiact`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.bases import BaseInfo
from hub.errors import InvalidInput, InvalidName, NotAnAdapter
from hub.files import safetensors_header
from hub.manifest import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    EVAL_JSON_FILE,
    AdapterManifest,
)
from hub.names import validate_name
from modelcards.fields import CardFields

LOSS_PNG = "loss.png"


@dataclass
class Facts:
    """What the card is built from.

    Attributes:
        adapter_dir: The adapter folder.
        base: The base the adapter belongs to.
        name: Adapter name (explicit, ``card.name``, or the folder's name when valid).
        version: Registered version, when known.
        manifest: The training manifest, or None for a plain PEFT folder.
        fields: The recipe's card fields (empty without a manifest).
        eval: ``eval.json``, or None when the adapter was not evaluated.
        adapter_config: ``adapter_config.json``.
        lora_parameters: Number of LoRA parameters (from the safetensors header).
        lora_dtype: Storage dtype of the LoRA tensors.
        has_loss_png: The folder holds ``loss.png``.
    """

    adapter_dir: Path
    base: BaseInfo
    name: str | None
    version: int | None
    manifest: AdapterManifest | None
    fields: CardFields
    eval: dict[str, Any] | None
    adapter_config: dict[str, Any]
    lora_parameters: int
    lora_dtype: str
    has_loss_png: bool
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        """The model string apps send (``BASE+NAME``; ``NAME`` literally when unnamed)."""
        return f"{self.base.name}+{self.name or 'NAME'}"

    @property
    def ref(self) -> str:
        """``NAME@V`` or ``NAME`` as the CLI takes it."""
        if not self.name:
            return ""
        return f"{self.name}@{self.version}" if self.version else self.name


def _adapter_name(explicit: str | None, fields: CardFields, folder: Path) -> str | None:
    # A store folder is adapters/NAME/vN: its name is the parent's.
    folder_name = folder.parent.name if re.fullmatch(r"v\d+", folder.name) else folder.name
    for candidate in (explicit, fields.name, folder_name.lower()):
        if not candidate:
            continue
        try:
            return validate_name(candidate)
        except InvalidName:
            if candidate in (explicit, fields.name):
                raise
    return None


def gather(
    adapter_dir: Path, base: BaseInfo, *, name: str | None = None, version: int | None = None
) -> Facts:
    """Read the adapter folder.

    Raises:
        NotAnAdapter: No ``adapter_config.json`` or weights.
        InvalidInput: A malformed manifest, ``eval.json`` or card field.
        InvalidName: An explicit or ``card.name`` that is not a valid adapter name.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    weights = adapter_dir / ADAPTER_WEIGHTS_FILE
    if not config_path.is_file() or not weights.is_file():
        raise NotAnAdapter(
            f"{adapter_dir} is not a PEFT adapter folder (needs {ADAPTER_CONFIG_FILE} and "
            f"{ADAPTER_WEIGHTS_FILE})",
            fix="Pass the folder `loradock train` wrote.",
        )
    config = json.loads(config_path.read_text())
    manifest = AdapterManifest.read(adapter_dir)
    fields = CardFields.from_dict(manifest.extra.get("card") if manifest else None)
    eval_doc = None
    eval_path = adapter_dir / EVAL_JSON_FILE
    if eval_path.is_file():
        try:
            eval_doc = json.loads(eval_path.read_text())
        except json.JSONDecodeError as exc:
            raise InvalidInput(
                f"{eval_path} is not JSON: {exc.msg}", fix="Re-run `loradock eval`."
            ) from exc
    count, dtype = 0, ""
    for key, meta in safetensors_header(weights).items():
        if "lora_" not in key:
            continue
        size = 1
        for dim in meta["shape"]:
            size *= dim
        count += size
        dtype = dtype or meta["dtype"]
    if version is None and re.fullmatch(r"v\d+", adapter_dir.name):
        version = int(adapter_dir.name[1:])
    return Facts(
        adapter_dir=adapter_dir,
        base=base,
        name=_adapter_name(name, fields, adapter_dir),
        version=version,
        manifest=manifest,
        fields=fields,
        eval=eval_doc,
        adapter_config=config,
        lora_parameters=count,
        lora_dtype=dtype,
        has_loss_png=(adapter_dir / LOSS_PNG).is_file(),
        hyperparameters=dict(manifest.hyperparameters) if manifest else {},
    )
