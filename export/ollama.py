"""Ollama builds: a folder with the GGUF(s), a Modelfile whose TEMPLATE is checked, and LICENSE.

The reliable local build is a merged GGUF with an explicit TEMPLATE and ``PARAMETER stop`` lines
(lesson 7): without them Ollama falls back to ``{{ .Prompt }}`` and the model never sees its chat
markers or never stops. The TEMPLATE is the Jinja chat template the adapter was trained with,
translated and verified by `export.templates`; stops are the family's end markers; SYSTEM is the
recipe's system prompt when the manifest records one.

``adapter_only`` writes ``FROM`` the base GGUF plus ``ADAPTER`` the GGUF LoRA instead. Ollama's
ADAPTER support covers few architectures and has been reported broken in recent versions, so the
Modelfile and the result say so.

If an ``ollama`` binary is on PATH, ``ollama create`` runs; otherwise the exact commands are
returned for the user to run. Where the job ends: this module writes the Modelfile and drives the
``ollama`` export; GGUF writing and parity live in `export.pipeline` and below.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from export.config import GgufOptions, LoraGgufOptions, OllamaOptions, ParityOptions
from export.llama_convert import uses_converter
from export.pipeline import ExportResult, StepCallback, Steps, base_gguf, resolve
from export.templates import Translation
from hub.errors import InvalidInput, Unsupported
from hub.files import atomic_dir
from hub.manifest import AdapterManifest
from hub.store import Store

ADAPTER_NOTE = (
    "Adapter-only build: Ollama's ADAPTER support is narrower than a merged build (few "
    "architectures; reported failures in recent versions). If `ollama create` or the answers "
    "fail, build a merged model instead: `loradock export ollama NAME` without --adapter-only."
)
_OLLAMA_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}(:[A-Za-z0-9._-]{1,64})?")
_SYSTEM_KEYS = ("system_prompt", "system")


def recipe_system_prompt(manifest: AdapterManifest | None) -> str | None:
    """The system prompt the recipe trained with (``extra`` or ``hyperparameters``), if any."""
    if manifest is None:
        return None
    for section in (manifest.extra, manifest.hyperparameters):
        for key in _SYSTEM_KEYS:
            value = section.get(key)
            if isinstance(value, str) and value.strip():
                return value
    return None


def _quoted(directive: str, text: str) -> str:
    if '"""' in text:
        raise Unsupported(
            f'The {directive} text contains """, which a Modelfile cannot quote',
            fix=f"Remove triple quotes from the {directive.lower()} text.",
        )
    return f'{directive} """{text}"""'


def license_text(model: str, base_id: str, base_license: str, adapter_license: str) -> str:
    """LICENSE text: the base's and the adapter's licences by SPDX id."""
    lines = [f"{model}: LoRA adapter on {base_id}."]
    lines.append(f"Base model licence: {base_license or 'not stated'}"
                 + (" (https://www.apache.org/licenses/LICENSE-2.0)"
                    if base_license.lower() == "apache-2.0" else "") + ".")
    lines.append(f"Adapter licence: {adapter_license or 'not stated (same as the base assumed)'}.")
    return "\n".join(lines)


def build_modelfile(*, model_file: str, translation: Translation, license: str,
                    system: str | None = None, adapter_file: str | None = None,
                    header: list[str] | None = None) -> str:
    """Return the Modelfile text (paths relative to the Modelfile's folder)."""
    lines = [f"# {line}" for line in (header or [])]
    if adapter_file:
        lines += [f"# {ADAPTER_NOTE}"]
    lines.append(f"FROM ./{model_file}")
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    lines.append(_quoted("TEMPLATE", translation.go_template))
    for stop in translation.stops:
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    if system and translation.supports_system:
        lines.append(_quoted("SYSTEM", system))
    lines.append(_quoted("LICENSE", license))
    return "\n".join(lines) + "\n"


def ollama_commands(folder: Path, model_name: str) -> list[str]:
    """The exact commands that create and run the model."""
    return [f"cd {folder} && ollama create {model_name} -f Modelfile", f"ollama run {model_name}"]


def run_ollama_create(folder: Path, model_name: str) -> tuple[bool, str]:
    """Run ``ollama create`` when the binary is on PATH; returns (ran ok, output tail)."""
    binary = shutil.which("ollama")
    if binary is None:
        return False, "ollama is not on PATH"
    proc = subprocess.run([binary, "create", model_name, "-f", "Modelfile"], cwd=folder,
                          capture_output=True, text=True, timeout=1800, check=False)
    return proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]


def _translation_for(base_path: Path, chat_template: str, pre: str | None) -> Translation:
    from export.gguf_tokenizer import read_tokenizer
    from export.templates import translate

    config = json.loads((base_path / "config.json").read_text())
    if uses_converter(config):  # the tokens llama.cpp's converter records, as transformers reads
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_path)
        ids = tokenizer("x")["input_ids"]
        add_bos = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
        return translate(chat_template, bos_token=tokenizer.bos_token or "",
                         eos_token=tokenizer.eos_token or "", add_bos=add_bos)
    meta = read_tokenizer(base_path, config, pre_tokenizer=pre, chat_template=chat_template)
    bos = meta.tokens[meta.special_ids["bos"]] if "bos" in meta.special_ids else ""
    eos = meta.tokens[meta.special_ids["eos"]] if "eos" in meta.special_ids else ""
    return translate(chat_template, bos_token=bos, eos_token=eos, add_bos=meta.add_bos)


def _place(src: Path, dst: Path) -> None:
    """Hard-link a cached file into the output when possible, else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_ollama(store: Store, name: str, version: int | None, out: Path, *,
                  options: OllamaOptions | None = None, parity: ParityOptions | None = None,
                  on_step: StepCallback | None = None) -> ExportResult:
    """``loradock export ollama``: GGUF + checked Modelfile in ``out``; ``ollama create`` if any."""
    from export.merge import chat_template_for, load_for_export
    from export.parity import enforce, gguf_parity
    from export.pipeline import (
        base_weights_note,
        check_exportable,
        reference_for,
        write_checked_lora,
        write_merged_gguf,
    )

    options = (options or OllamaOptions()).validate()
    parity = (parity or ParityOptions()).validate()
    record, base = resolve(store, name, version)
    check_exportable(base, Path(store.cache))
    model_name = options.model_name or f"{record.name}:v{record.version}"
    if not _OLLAMA_NAME.fullmatch(model_name):
        raise InvalidInput(
            f"Invalid Ollama model name {model_name!r}",
            fix="Use NAME or NAME:TAG with lower-case letters, digits, '.', '_', '-'.",
            param="model_name",
        )
    template = chat_template_for(record.path, Path(base.path))
    translation = _translation_for(Path(base.path), template, None)
    steps = Steps(7 if options.adapter_only else 6, on_step)
    out = Path(out)
    stem = f"{record.name}-v{record.version}"
    with atomic_dir(out) as tmp:
        if options.adapter_only:
            model_file = f"{base.name}.{options.quant}.gguf"
            adapter_file = f"{stem}.lora.gguf"
            report = write_checked_lora(store, record, base, tmp / adapter_file,
                                        options=LoraGgufOptions(), parity=parity, steps=steps,
                                        label=adapter_file, base_quant=options.quant)
            _place(base_gguf(store, base, options.quant), tmp / model_file)
        else:
            model_file, adapter_file = f"{stem}.{options.quant}.gguf", None
            steps("load fp32 base + adapter")
            loaded = load_for_export(Path(base.path), record.path,
                                     base_weights=options.base_weights)
            weights = loaded.base_weights
            steps("reference (PEFT, unmerged)")
            reference = reference_for(record, base, parity, loaded)
            steps(f"merge + write {options.quant}")
            write_merged_gguf(loaded, base, tmp / model_file, options.quant,
                              options=GgufOptions(quant=options.quant), name=stem,
                              threads=parity.threads, cache=Path(store.cache))
            del loaded
            steps(f"parity {options.quant} (llama.cpp)")
            report = gguf_parity(tmp / model_file, reference, kind=options.quant,
                                 threshold=parity.threshold_for(options.quant),
                                 threads=parity.threads)
            report.target = model_file
            enforce(report, parity.verify)
        steps("Modelfile")
        manifest = record.manifest
        licence = license_text(record.model, base.hf_id or base.name, base.license,
                               manifest.license if manifest else "")
        how = ("adapter only, on the original base weights" if adapter_file
               else base_weights_note(weights))
        header = [f"Written by loradock for {record.model} ({options.quant}, {how}).",
                  f"Parity with the PEFT adapter: {report.agreement:.1%} top-1 agreement "
                  f"(threshold {report.threshold:.0%}); TEMPLATE verified on "
                  f"{translation.checked} conversations ({translation.family}).",
                  *translation.notes]
        (tmp / "Modelfile").write_text(build_modelfile(
            model_file=model_file, translation=translation, license=licence,
            system=recipe_system_prompt(manifest), adapter_file=adapter_file, header=header))
        (tmp / "LICENSE").write_text(licence + "\n")
        result = ExportResult("ollama", record.model, [out], [report],
                              notes=[how, *translation.notes,
                                     *([ADAPTER_NOTE] if adapter_file else [])])
        result.commands = ollama_commands(out, model_name)
        (tmp / "export.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        steps("publish")
    steps("ollama create")
    if options.create and shutil.which("ollama"):
        ok, output = run_ollama_create(out, model_name)
        result.notes.append(f"ollama create {'succeeded' if ok else 'failed'}: {output[-400:]}")
        if ok:
            result.commands = [f"ollama run {model_name}"]
    steps.finish()
    return result
