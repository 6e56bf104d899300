"""The export commands as library functions: resolve, convert, check parity, publish atomically.

Each function does the whole job of one ``loradock export`` command: refuse what cannot be
exported before loading anything (architecture, DoRA...), load the fp32 base with the adapter,
compute the PEFT reference, write the output in a hidden temporary sibling, measure parity, and
only then rename it to its final name (`hub.files.atomic_dir` / `atomic_file`). A killed or failed
export leaves no file under the final name, only ``.tmp-*`` leftovers.

Outputs (``DIR`` = ``--out``):

- merged: ``DIR/`` is the HF folder (safetensors, tokenizer, chat template, README.md,
  export.json);
- gguf: ``DIR/NAME-vV.QUANT.gguf`` + ``DIR/NAME-vV.QUANT.parity.json``;
- lora-gguf: ``DIR/NAME-vV.lora.gguf`` + ``.parity.json``;
- ollama: ``DIR/`` with the GGUF(s), ``Modelfile``, ``LICENSE`` and ``export.json``
  (`export.ollama`).

Base GGUFs (for LoRA checks and adapter-only Ollama builds) are cached in the store's cache under
``gguf/``. Where the job ends: orchestration only; each conversion lives in its own module.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.config import (
    BaseWeights,
    GgufOptions,
    LoraGgufOptions,
    MergeOptions,
    ParityOptions,
)
from export.llama_convert import uses_converter
from export.merge import DriftReport
from export.parity import ParityReport
from hub.bases import BaseInfo
from hub.files import TMP_PREFIX, atomic_dir, atomic_file
from hub.names import validate_name
from hub.store import AdapterRecord, Store

StepCallback = Callable[[str, int, int], None]


@dataclass
class ExportResult:
    """What an export produced and measured.

    Attributes:
        kind: ``merged``, ``gguf``, ``lora-gguf`` or ``ollama``.
        model: ``BASE+NAME@V``.
        paths: Files or folders published.
        parity: Parity reports (one per checked file).
        drift: Merged vs the adapter on its quantised training base (merged exports).
        commands: Shell commands to run next (Ollama).
        notes: Caveats for the user.
    """

    kind: str
    model: str
    paths: list[Path] = field(default_factory=list)
    parity: list[ParityReport] = field(default_factory=list)
    drift: DriftReport | None = None
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "kind": self.kind,
            "model": self.model,
            "paths": [str(p) for p in self.paths],
            "parity": [r.to_dict() for r in self.parity],
            "drift": self.drift.to_dict() if self.drift else None,
            "commands": self.commands,
            "notes": self.notes,
        }


class Steps:
    """Reports named steps to an optional callback (the CLI's progress bar)."""

    def __init__(self, total: int, callback: StepCallback | None) -> None:
        self.total, self.done, self.callback = total, 0, callback

    def __call__(self, label: str) -> None:
        """Announce the step now starting."""
        if self.callback is not None:
            self.callback(label, self.done, self.total)
        self.done += 1

    def finish(self) -> None:
        """Mark the last step finished."""
        if self.callback is not None:
            self.callback("done", self.total, self.total)


def resolve(store: Store, name: str, version: int | None) -> tuple[AdapterRecord, BaseInfo]:
    """The adapter record (checked against its registered hashes) and its base."""
    validate_name(name)
    record = store.get(name, version)
    store.check(record)
    return record, store.base(record.base)


def base_config(base: BaseInfo) -> dict[str, Any]:
    """The base folder's ``config.json``."""
    return json.loads((Path(base.path) / "config.json").read_text())


def _write_json(path: Path, data: Any) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


# Reference outputs per (adapter content, base, prompts, tokens): several exports of one adapter
# in one process (tests, `export ollama`) compute the PEFT reference once.
_REFERENCES: dict[tuple, Any] = {}


def reference_for(record: AdapterRecord, base: BaseInfo, parity: ParityOptions,
                  loaded: Any = None, base_weights: BaseWeights = "auto") -> Any:
    """The PEFT reference for ``record`` (cached per process); loads the adapter if needed.

    The reference is the adapter, unmerged, on the base weights the export uses (``loaded``'s,
    else ``base_weights``): an export is checked against the model it claims to be.
    """
    from export.merge import load_for_export, training_values
    from export.parity import build_reference, pick_prompts

    if loaded is not None:
        weights = loaded.base_weights
    else:
        quantization = record.manifest.quantization if record.manifest else {}
        weights = "original" if training_values(quantization, base_weights) is None else "training"
    prompts = pick_prompts(record.manifest, parity.prompts)
    key = (record.digest, base.fingerprint, tuple(prompts), parity.max_tokens, weights)
    if key not in _REFERENCES:
        loaded = loaded or load_for_export(Path(base.path), record.path,
                                           base_weights=weights)  # type: ignore[arg-type]
        _REFERENCES.clear()
        _REFERENCES[key] = build_reference(loaded, prompts, parity.max_tokens)
    return _REFERENCES[key]


def _hidden(folder: Path, label: str) -> Path:
    return Path(folder) / f"{TMP_PREFIX}{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# -- merged -------------------------------------------------------------------------------


def export_merged(store: Store, name: str, version: int | None, out: Path, *,
                  options: MergeOptions | None = None, parity: ParityOptions | None = None,
                  on_step: StepCallback | None = None) -> ExportResult:
    """``loradock export merged``: an HF folder with the adapter merged in fp32/fp16/bf16."""
    from export.merge import cast_like_storage, load_for_export, measure_drift, merge, save_merged
    from export.parity import enforce, forward_logits, score

    options = (options or MergeOptions()).validate()
    parity = (parity or ParityOptions()).validate()
    record, base = resolve(store, name, version)
    steps = Steps(6, on_step)
    out = Path(out)
    with atomic_dir(out) as tmp:
        steps("load fp32 base + adapter")
        loaded = load_for_export(Path(base.path), record.path, base_weights=options.base_weights)
        steps("reference (PEFT, unmerged)")
        reference = reference_for(record, base, parity, loaded)
        steps("merge in fp32")
        merged = cast_like_storage(merge(loaded), options.dtype)
        started = time.monotonic()
        logits = forward_logits(merged, reference.sequences, reference.starts)
        report = score(options.dtype, f"{out.name} ({options.dtype})", reference, logits,
                       parity.threshold_for(options.dtype), started)
        enforce(report, parity.verify)
        steps("drift vs quantised training base")
        drift = (measure_drift(loaded, logits, reference.sequences, reference.starts)
                 if options.measure_quantised else DriftReport("not measured", note="disabled"))
        steps("save")
        save_merged(merged, loaded, tmp, options.dtype)
        result = ExportResult("merged", record.model, [out], [report], drift,
                              notes=[base_weights_note(loaded.base_weights)])
        (tmp / "README.md").write_text(_merged_card(record, base, options, report, drift,
                                                    loaded.base_weights))
        (tmp / "export.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        steps("publish")
    steps.finish()
    return result


def base_weights_note(weights: str) -> str:
    """One sentence on which base weights an export merged into."""
    if weights == "training":
        return ("merged into the 4-bit (NF4) values the QLoRA adapter was trained on, "
                "dequantised to fp32: the model evaluation scored and the server runs on CPU")
    return "merged into the original unquantised base weights"


def _merged_card(record: AdapterRecord, base: BaseInfo, options: MergeOptions,
                 report: ParityReport, drift: DriftReport, weights: str) -> str:
    manifest = record.manifest
    licence = (manifest.license if manifest and manifest.license else base.license) or "other"
    lines = [
        "---",
        f"base_model: {base.hf_id or base.name}",
        f"license: {licence}",
        "tags: [loradock, merged-lora]",
        "---",
        "",
        f"# {record.name} v{record.version} merged into {base.hf_id or base.name}",
        "",
        f"LoRA adapter `{record.model}` merged with `merge_and_unload` in fp32, "
        f"{base_weights_note(weights)}; saved as {options.dtype}.",
        "",
        f"- Parity with the adapter on the unmerged base: {report.agreement:.1%} top-1 "
        f"agreement over {report.positions} tokens (mean |dlogit| {report.mean_abs_dlogit:.4f}).",
    ]
    if drift.top1_agreement is not None:
        lines.append(
            f"- Against the adapter on its {drift.reference.split(' on ')[-1]} (what it was "
            f"trained on): {drift.top1_agreement:.1%} top-1 agreement, mean |dlogit| "
            f"{drift.mean_abs_dlogit:.4f} ({drift.note})."
        )
    if manifest and manifest.intended_use:
        lines += ["", "## Intended use", "", manifest.intended_use]
    return "\n".join(lines) + "\n"


# -- GGUF ---------------------------------------------------------------------------------


def _merged_state(loaded: Any) -> dict[str, Any]:
    from export.merge import merge

    return dict(merge(loaded).state_dict())


def write_merged_gguf(loaded: Any, base: BaseInfo, target: Path, quant: str, *,
                      options: GgufOptions, name: str, threads: int = 0,
                      cache: Path | None = None) -> None:
    """Merge (fp32) and write ``target`` as ``quant``; q8_0/q4_k_m go through an f32 file.

    ``cache`` is the store's cache, where llama.cpp's converter is kept (`uses_converter`).
    """
    from export.gguf_writer import write_model_gguf
    from export.quantize import quantize_gguf

    if uses_converter(base_config(base)):
        _write_converted_merged(loaded, target, quant, name=name, threads=threads,
                                cache=Path(cache) if cache else Path(Store().cache))
        return
    state = _merged_state(loaded)
    kwargs = dict(tensors=state, chat_template=loaded.chat_template, name=name,
                  license=base.license, pre_tokenizer=options.pre_tokenizer)
    if quant == "f16":
        write_model_gguf(Path(base.path), target, dtype="f16", **kwargs)
        return
    f32 = _hidden(target.parent, "f32.gguf")
    try:
        write_model_gguf(Path(base.path), f32, dtype="f32", **kwargs)
        state.clear()
        quantize_gguf(f32, target, quant, threads=threads)  # type: ignore[arg-type]
    finally:
        f32.unlink(missing_ok=True)


def _write_converted_merged(loaded: Any, target: Path, quant: str, *, name: str, threads: int,
                            cache: Path) -> None:
    """Merged model → HF folder (fp32) → llama.cpp's converter → ``quant``."""
    from export.llama_convert import convert_model
    from export.merge import merge, save_merged
    from export.quantize import quantize_gguf

    folder = _hidden(target.parent, "merged")
    f32 = _hidden(target.parent, "f32.gguf")
    try:
        save_merged(merge(loaded), loaded, folder, "fp32")
        if quant == "f16":
            convert_model(folder, target, cache=cache, dtype="f16", name=name)
            return
        convert_model(folder, f32, cache=cache, dtype="f32", name=name)
        quantize_gguf(f32, target, quant, threads=threads)  # type: ignore[arg-type]
    finally:
        f32.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


def check_exportable(base: BaseInfo, cache: Path) -> None:
    """Refuse, before loading anything, a base neither GGUF writer takes (`uses_converter`)."""
    from export.gguf_writer import check_architecture
    from export.llama_convert import check_supported

    config = base_config(base)
    if uses_converter(config):
        check_supported(config, cache)
    else:
        check_architecture(config)


def export_gguf(store: Store, name: str, version: int | None, out_dir: Path, *,
                options: GgufOptions | None = None, parity: ParityOptions | None = None,
                on_step: StepCallback | None = None) -> ExportResult:
    """``loradock export gguf``: the merged model as one GGUF, quantised and parity-checked."""
    from export.merge import load_for_export
    from export.parity import enforce, gguf_parity

    options = (options or GgufOptions()).validate()
    parity = (parity or ParityOptions()).validate()
    record, base = resolve(store, name, version)
    check_exportable(base, Path(store.cache))
    steps = Steps(5, on_step)
    final = Path(out_dir) / f"{record.name}-v{record.version}.{options.quant}.gguf"
    with atomic_file(final) as tmp:
        steps("load fp32 base + adapter")
        loaded = load_for_export(Path(base.path), record.path, base_weights=options.base_weights)
        steps("reference (PEFT, unmerged)")
        reference = reference_for(record, base, parity, loaded)
        steps(f"merge + write {options.quant}")
        write_merged_gguf(loaded, base, tmp, options.quant, options=options,
                          name=f"{record.name}-v{record.version}", threads=parity.threads,
                          cache=Path(store.cache))
        weights = loaded.base_weights
        del loaded
        steps(f"parity {options.quant} (llama.cpp)")
        report = gguf_parity(tmp, reference, kind=options.quant,
                             threshold=parity.threshold_for(options.quant), threads=parity.threads)
        report.target = final.name
        enforce(report, parity.verify)
        steps("publish")
    result = ExportResult("gguf", record.model, [final], [report],
                          notes=[base_weights_note(weights)])
    _write_json(final.with_suffix(".parity.json"), result.to_dict())
    steps.finish()
    return result


def base_gguf(store: Store, base: BaseInfo, quant: str = "f16") -> Path:
    """The base model as GGUF (``f16`` or a quant), written once into the store's cache."""
    import fcntl

    from export.gguf_writer import write_model_gguf
    from export.quantize import quantize_gguf

    folder = Path(store.cache) / "gguf"
    final = folder / f"{base.name}-{base.fingerprint[:16]}.{quant}.gguf"
    if final.is_file():
        return final
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".write.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_file():
            return final
        with atomic_file(final) as tmp:
            if uses_converter(base_config(base)):
                _convert_base(store, base, tmp, quant)
            elif quant == "f16":
                write_model_gguf(Path(base.path), tmp, dtype="f16", name=base.name,
                                 license=base.license)
            else:
                f32 = _hidden(folder, "f32.gguf")
                try:
                    write_model_gguf(Path(base.path), f32, dtype="f32", name=base.name,
                                     license=base.license)
                    quantize_gguf(f32, tmp, quant)  # type: ignore[arg-type]
                finally:
                    f32.unlink(missing_ok=True)
    return final


def _convert_base(store: Store, base: BaseInfo, target: Path, quant: str) -> None:
    from export.llama_convert import convert_model
    from export.quantize import quantize_gguf

    if quant == "f16":
        convert_model(Path(base.path), target, cache=Path(store.cache), dtype="f16",
                      name=base.name)
        return
    f32 = _hidden(target.parent, "f32.gguf")
    try:
        convert_model(Path(base.path), f32, cache=Path(store.cache), dtype="f32", name=base.name)
        quantize_gguf(f32, target, quant)  # type: ignore[arg-type]
    finally:
        f32.unlink(missing_ok=True)


def write_checked_lora(store: Store, record: AdapterRecord, base: BaseInfo, target: Path, *,
                       options: LoraGgufOptions, parity: ParityOptions, steps: Steps,
                       label: str, base_quant: str = "f16") -> ParityReport:
    """Write the GGUF LoRA to ``target`` and check it on the base GGUF against PEFT."""
    from export.lora_gguf import write_lora_gguf
    from export.parity import enforce, gguf_parity

    steps("write GGUF LoRA")
    if uses_converter(base_config(base)):
        from export.llama_convert import convert_lora

        convert_lora(record.path, Path(base.path), target, cache=Path(store.cache),
                     dtype=options.dtype)  # type: ignore[arg-type]
    else:
        write_lora_gguf(record.path, base_config(base), target, dtype=options.dtype,
                        name=f"{record.name}-v{record.version}")
    steps(f"base GGUF ({base_quant}, cached)")
    base_file = base_gguf(store, base, base_quant)
    steps("reference (PEFT, unmerged)")
    reference = reference_for(record, base, parity, base_weights="original")  # the stock base
    steps("parity LoRA on base GGUF (llama.cpp)")
    kind = "lora" if base_quant == "f16" else base_quant
    report = gguf_parity(base_file, reference, kind=kind, threshold=parity.threshold_for(kind),
                         lora_path=target, threads=parity.threads)
    report.target = f"{base_file.name} + {label}"
    return enforce(report, parity.verify)


def export_lora_gguf(store: Store, name: str, version: int | None, out_dir: Path, *,
                     options: LoraGgufOptions | None = None, parity: ParityOptions | None = None,
                     on_step: StepCallback | None = None) -> ExportResult:
    """``loradock export lora-gguf``: the adapter as a llama.cpp GGUF LoRA, parity-checked."""
    options = (options or LoraGgufOptions()).validate()
    parity = (parity or ParityOptions()).validate()
    record, base = resolve(store, name, version)
    check_exportable(base, Path(store.cache))
    steps = Steps(5, on_step)
    final = Path(out_dir) / f"{record.name}-v{record.version}.lora.gguf"
    with atomic_file(final) as tmp:
        report = write_checked_lora(store, record, base, tmp, options=options, parity=parity,
                                    steps=steps, label=final.name)
        steps("publish")
    result = ExportResult("lora-gguf", record.model, [final], [report])
    _write_json(final.with_suffix(".parity.json"), result.to_dict())
    steps.finish()
    return result
