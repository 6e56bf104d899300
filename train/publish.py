"""The finished adapter folder: weights, config, the base's chat template, manifest, metrics, data.

Layout written by `publish_adapter` (atomically: a hidden sibling renamed into place)::

    adapter_model.safetensors   LoRA weights (PEFT save_pretrained, safetensors only)
    adapter_config.json         PEFT config; base_model_name_or_path = the hub's base id
    chat_template.jinja         the base's chat template, byte for byte (not the training copy)
    loradock.json               hub.manifest.AdapterManifest
    metrics.jsonl, loss.png     train/validation loss per step, and their curves
    data/                       train/validation/test.jsonl + data_report.json

Evaluation (``eval.json``, ``eval_report.md``) and the card (``README.md``) are added later by
train/eval and modelcards; PEFT's own generated README is not kept.

Where the job ends: this module writes files. Training and the work folder are `train.run`'s.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Any

from hub.bases import BaseInfo
from hub.errors import InvalidInput
from hub.files import atomic_dir
from hub.manifest import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CARD_FILE,
    CHAT_TEMPLATE_FILE,
    AdapterManifest,
)
from hub.names import public_name
from train.quant import QuantSpec
from train.recipe import Recipe

FLOPS_FORMULA = "6 * (frozen + trainable parameters) * tokens_seen"
# Recorded for DoRA adapters: no loradock engine applies DoRA's magnitude vectors at run time.
DORA_SERVING = {
    "use_dora": True,
    "served_by": "merged exports only (loradock export merged / gguf / ollama)",
    "server": "refuses DoRA adapters at load time",
}


def base_chat_template(base: BaseInfo) -> bytes:
    """The base's chat template exactly as stored in its folder.

    Raises:
        InvalidInput: When the base folder has no chat template.
    """
    folder = Path(base.path)
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_bytes()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str) and template:
            return template.encode()
    raise InvalidInput(
        f"Base {base.name!r} has no chat template in {folder}",
        fix="Use an instruct base whose tokenizer ships a chat template.",
    )


def loradock_version() -> str:
    """The installed loradock version (``0+unknown`` when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loradock")
    except PackageNotFoundError:
        return "0+unknown"


def library_versions() -> dict[str, str]:
    """Versions of the libraries a run depends on (recorded in the manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def build_manifest(
    recipe: Recipe,
    base: BaseInfo,
    spec: QuantSpec,
    *,
    data_report: dict[str, Any],
    compute: dict[str, Any],
    parent: str | None,
    extra: dict[str, Any] | None = None,
) -> AdapterManifest:
    """Assemble the manifest of a finished run.

    Args:
        recipe: The recipe used (every field goes into ``hyperparameters``).
        base: The base trained on.
        spec: Quantisation used.
        data_report: ``DataReport.to_dict()``.
        compute: Device, wall time, tokens, FLOPs, threads...
        parent: ``NAME@V`` of the adapter trained from, if any.
        extra: More free-form fields.
    """
    return AdapterManifest(
        base={"name": base.name, "fingerprint": base.fingerprint,
              "source": base.hf_id or base.name},
        method=recipe.method,
        data={**data_report, "source": public_name(data_report.get("source"))},
        hyperparameters={**recipe.to_dict(), "data": public_name(recipe.data),
                         "output": public_name(recipe.output)},  # names, never local paths
        quantization=spec.record(),
        compute=compute,
        intended_use=recipe.intended_use,
        out_of_scope_use=recipe.out_of_scope_use,
        license=adapter_licence(recipe.license, base),
        parent=parent,
        created_at=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        loradock_version=loradock_version(),
        extra={
            "card": recipe.card_fields(),
            "eval_prompts": list(recipe.eval_prompts),
            "system_prompt": recipe.system_prompt,
            "eval_settings": {
                "few_shot_k": recipe.few_shot_k,
                "max_eval_examples": recipe.max_eval_examples,
                "max_new_tokens": recipe.max_new_tokens,
            },
            "libraries": library_versions(),
            **({"serving": DORA_SERVING} if recipe.use_dora else {}),
            **(extra or {}),
        },
    )


def adapter_licence(asked: str, base: BaseInfo) -> str:
    """The recipe's licence, else the base's (a derivative is bound by it), else apache-2.0."""
    return asked.strip() or base.license or "apache-2.0"


def estimated_flops(total_parameters: int, tokens_seen: int) -> int:
    """Training FLOPs estimate: 6 per parameter per token (forward + backward)."""
    return 6 * int(total_parameters) * int(tokens_seen)


def save_adapter_weights(model: Any, folder: Path, base: BaseInfo) -> None:
    """Save the ``default`` LoRA adapter as safetensors and point its config at the base id."""
    model.save_pretrained(
        str(folder), safe_serialization=True, selected_adapters=["default"],
        save_embedding_layers=False,
    )
    (folder / CARD_FILE).unlink(missing_ok=True)  # PEFT's stub card; modelcards writes ours
    config_path = folder / ADAPTER_CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base.hf_id or base.name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not (folder / ADAPTER_WEIGHTS_FILE).is_file():
        raise InvalidInput(
            f"PEFT did not write {ADAPTER_WEIGHTS_FILE} in {folder}",
            fix="Check the installed peft version (>= 0.18 is required).",
        )


def publish_adapter(
    final: Path,
    *,
    model: Any,
    base: BaseInfo,
    manifest: AdapterManifest,
    metrics: Path,
    loss_png: Path,
    data_dir: Path,
    overwrite: bool = False,
) -> Path:
    """Write the adapter folder ``final`` atomically (see the module docstring for its layout).

    Returns:
        ``final``.

    Raises:
        InvalidInput: ``final`` exists and ``overwrite`` is False.
    """
    template = base_chat_template(base)
    with atomic_dir(Path(final), overwrite=overwrite) as tmp:
        save_adapter_weights(model, tmp, base)
        (tmp / CHAT_TEMPLATE_FILE).write_bytes(template)
        if metrics.is_file():
            shutil.copyfile(metrics, tmp / metrics.name)
        if loss_png.is_file():
            shutil.copyfile(loss_png, tmp / loss_png.name)
        shutil.copytree(data_dir, tmp / "data")
        _name_the_source(tmp / "data" / "data_report.json")
        manifest.write(tmp)
    return Path(final)


def _name_the_source(report_path: Path) -> None:
    """The published copy of ``data_report.json`` names its source file, not its local path."""
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        report["source"] = public_name(report.get("source"))
        report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
