"""EU AI Act notes computed from a run: the modifier's role, Art. 53 / Annex XI-XII items, energy.

The role follows the Commission's guidelines on the scope of the obligations for providers of
general-purpose AI models (July 2025): a downstream modifier is presumed to become the provider
of a new GPAI model when the modification's training compute exceeds one third of the original
model's training compute (`ONE_THIRD`). The guidelines' indicative criterion for a model to be a
GPAI model at all is more than 10^23 FLOP (`GPAI_CRITERION_FLOP`).

Compute figures and how each was obtained:

- modification: ``compute.estimated_flops`` from the manifest (train's estimate); without it,
  ``6 × base parameters × tokens_seen`` (forward and backward through the whole base, an upper
  bound for LoRA, whose frozen weights need no weight gradients).
- base: ``card.base_training_flops`` when the recipe gives its provider's figure; else
  ``6 × N × D`` with N the base's parameter count and D its pre-training tokens from the base
  description (the usual dense-transformer approximation: 6 FLOP per parameter per token).
- energy: ``card.energy_kwh`` when measured; else ``wall time × average power`` with the power
  from ``card.device_power_w`` or a stated typical draw for the device type (`TYPICAL_POWER_W`).

Where the job ends: this module computes notes and lists what is missing; `card` renders them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelcards.facts import Facts
from modelcards.fields import DATA_SOURCE_HEADINGS

ONE_THIRD = 1 / 3
GPAI_CRITERION_FLOP = 1e23
TYPICAL_POWER_W = {"cpu": 65.0, "cuda": 400.0, "mps": 30.0, "xpu": 300.0}
GUIDELINES = "the Commission's GPAI guidelines (July 2025)"


def sci(value: float) -> str:
    """Format a large number as the card prints it (``1.62e+21``)."""
    return f"{value:.2e}"


@dataclass
class Role:
    """The modifier's role under the one-third criterion.

    Attributes:
        modification_flops: Training compute of this adapter (FLOP), if known.
        modification_method: How that figure was obtained.
        base_flops: Training compute of the base model (FLOP), if known.
        base_method: How that figure was obtained.
        ratio: ``modification_flops / base_flops`` when both are known.
        provider: True when the ratio exceeds one third; None when unknown.
        sentence: The figures and the resulting role in one sentence.
    """

    modification_flops: float | None
    modification_method: str
    base_flops: float | None
    base_method: str
    ratio: float | None
    provider: bool | None
    sentence: str
    threshold: float = ONE_THIRD


@dataclass
class Notes:
    """The EU AI Act section's content, ready to render.

    Attributes:
        role: The role verdict.
        gpai_note: A sentence on whether the base itself meets the GPAI compute criterion.
        items: ``(item, reference, value)`` rows of the Annex XI/XII items the run knows.
        energy_kwh: Training energy estimate, when computable.
        energy_method: How it was computed.
        copyright_policy: Art. 53(1)(c) text, or None when missing.
        summary: ``(heading, text)`` pairs under the AI Office template's headings.
        art50: What a deployer of the chat endpoint must disclose.
        process: The training process in one line (method, objective, quantisation).
        to_complete: Missing items, each naming where to fill it in.
    """

    role: Role
    gpai_note: str
    items: list[tuple[str, str, str]]
    energy_kwh: float | None
    energy_method: str
    copyright_policy: str | None
    summary: list[tuple[str, str]]
    art50: list[str]
    process: str = ""
    to_complete: list[str] = field(default_factory=list)


def modification_compute(facts: Facts) -> tuple[float | None, str]:
    """This run's training compute and how it was obtained."""
    compute = facts.manifest.compute if facts.manifest else {}
    if compute.get("estimated_flops"):
        return float(compute["estimated_flops"]), "train's estimate in the manifest"
    tokens = compute.get("tokens_seen")
    if tokens and facts.base.num_parameters:
        flops = 6.0 * facts.base.num_parameters * float(tokens)
        return flops, (
            f"6 × {facts.base.num_parameters:,} base parameters × {int(tokens):,} tokens seen "
            "(an upper bound for LoRA)"
        )
    return None, "unknown: the manifest records neither estimated_flops nor tokens_seen"


def base_compute(facts: Facts) -> tuple[float | None, str]:
    """The base model's training compute and how it was obtained."""
    if facts.fields.base_training_flops:
        return facts.fields.base_training_flops, "card.base_training_flops (recipe)"
    n, d = facts.base.num_parameters, facts.base.training_tokens
    if n and d:
        return 6.0 * n * d, (
            f"estimated as 6 × N × D with N = {n:,} parameters and D = {d:,} pre-training tokens, "
            "assuming a dense transformer trained for one pass at 6 FLOP per parameter per token"
        )
    return None, "unknown: the base description has no parameter or training-token count"


def role_verdict(
    modification: float | None, mod_method: str, base: float | None, base_method: str
) -> Role:
    """Apply the one-third criterion (more than one third makes the modifier a provider)."""
    if modification is None or base is None:
        missing = "the modification's" if modification is None else "the base model's"
        sentence = (
            f"The role cannot be computed because {missing} training compute is unknown; "
            f"under {GUIDELINES} a modifier becomes the provider of a new general-purpose AI "
            "model only if the modification uses more than one third of the base's training "
            "compute."
        )
        return Role(modification, mod_method, base, base_method, None, None, sentence)
    ratio = modification / base
    provider = ratio > ONE_THIRD
    head = (
        f"This modification used {sci(modification)} FLOP, {ratio:.2e} times the base's "
        f"{sci(base)} FLOP of training compute, "
    )
    if provider:
        tail = (
            f"above the one-third criterion of {GUIDELINES}: the modifier is presumed to be "
            "the provider of a new general-purpose AI model, with obligations limited to the "
            "modification (Recital 109)."
        )
    else:
        tail = (
            f"below the one-third criterion of {GUIDELINES}: the modifier is not presumed to be "
            "the provider of a new general-purpose AI model; the base provider's documentation "
            "stays the reference and this card documents the modification."
        )
    return Role(modification, mod_method, base, base_method, ratio, provider, head + tail)


def energy(facts: Facts) -> tuple[float | None, str]:
    """Training energy in kWh and the method, or None when the wall time is unknown."""
    if facts.fields.energy_kwh:
        return facts.fields.energy_kwh, "measured (card.energy_kwh)"
    compute = facts.manifest.compute if facts.manifest else {}
    seconds = compute.get("wall_time_s")
    if not seconds:
        return None, "unknown: the manifest records no wall time"
    device = str(compute.get("device") or "cpu").split(":")[0].lower()
    if facts.fields.device_power_w:
        watts, source = facts.fields.device_power_w, "card.device_power_w"
    else:
        watts = TYPICAL_POWER_W.get(device, TYPICAL_POWER_W["cpu"])
        source = f"an assumed typical draw for a {device} device; set card.device_power_w"
    kwh = float(seconds) * watts / 3.6e6
    return kwh, (
        f"estimated as wall time × average power = {float(seconds):.1f} s × {watts:g} W "
        f"({source}) = {kwh:.2e} kWh; device only, no cooling or idle overhead (PUE 1.0)"
    )


def build_notes(facts: Facts) -> Notes:
    """Compute every EU AI Act note for the card and the list of what is missing."""
    todo: list[str] = []
    m = facts.manifest
    fields_ = facts.fields
    mod, mod_method = modification_compute(facts)
    base_flops, base_method = base_compute(facts)
    if mod is None:
        todo.append("Modification compute: record compute.estimated_flops (`loradock train`)")
    if base_flops is None:
        todo.append("Base training compute: set card.base_training_flops in the recipe")
    role = role_verdict(mod, mod_method, base_flops, base_method)
    if base_flops is not None and base_flops < GPAI_CRITERION_FLOP:
        gpai_note = (
            f"The base's training compute ({sci(base_flops)} FLOP) is below the guidelines' "
            "10^23 FLOP indicative criterion for general-purpose AI models, so the base itself "
            "may not be a GPAI model; the Art. 53 items below are given as good practice."
        )
    elif base_flops is not None:
        gpai_note = (
            f"The base's training compute ({sci(base_flops)} FLOP) meets the guidelines' 10^23 "
            "FLOP indicative criterion for general-purpose AI models."
        )
    else:
        gpai_note = "Whether the base meets the GPAI compute criterion is unknown."
    kwh, energy_method = energy(facts)
    if kwh is None:
        todo.append("Training energy: record the wall time or set card.energy_kwh")

    def need(value: Any, what: str, where: str) -> str:
        if value:
            return str(value)
        todo.append(f"{what}: set {where}")
        return f"**To complete**: {what[:1].lower() + what[1:]} ({where})"

    compute = m.compute if m else {}
    config = facts.adapter_config
    items = [
        ("Tasks the model is intended for", "Annex XI 1(a), XII 1(a)",
         need(m.intended_use if m else "", "Intended use", "intended_use in the recipe")),
        ("Acceptable use policy", "Annex XI 1(b), XII 1(b)",
         "Out of scope: " + need(m.out_of_scope_use if m else "", "Out-of-scope use",
                                 "out_of_scope_use in the recipe")),
        ("Date of release and distribution", "Annex XI 1(c), XII 1(c)",
         need(fields_.release, "Release date and distribution", "card.release")),
        ("Architecture and parameters", "Annex XI 1(d), XII 1(f)",
         f"LoRA adapter (r={config.get('r')}, alpha={config.get('lora_alpha')}, targets "
         f"{', '.join(sorted(_targets(config)))}) with {facts.lora_parameters:,} parameters on "
         f"{facts.base.architecture or facts.base.model_type} {facts.base.name} "
         f"({facts.base.num_parameters:,} parameters)"),
        ("Modality and format of inputs and outputs", "Annex XI 1(e), XII 1(g), 2(b)",
         f"text in, text out; chat messages rendered with the saved chat template; at most "
         f"{facts.base.context_length:,} tokens of context"),
        ("Licence", "Annex XI 1(f), XII 1(h)",
         need(m.license if m else "", "Adapter licence", "license in the recipe")
         + (f" (base: {facts.base.license})" if facts.base.license else "")),
        ("Integration and software", "Annex XI 2(a), XII 1(d)-(e), 2(a)",
         f"PEFT {config.get('peft_version', '(version not recorded)')} adapter for "
         f"{facts.base.hf_id or facts.base.name}; served by `loradock serve` (OpenAI API)"
         + (f"; made with loradock {m.loradock_version}" if m and m.loradock_version else "")),
        ("Training process and design choices", "Annex XI 2(b)",
         _process(facts)),
        ("Training data: type, provenance, curation, size", "Annex XI 2(c), XII 2(c)",
         _data_line(facts)),
        ("Known biases of the data", "Annex XI 2(c)",
         need(fields_.known_biases, "Known biases of the data", "card.known_biases")),
        ("Computational resources and time", "Annex XI 2(d)",
         (f"{sci(mod)} FLOP ({mod_method})" if mod is not None else "FLOP unknown")
         + f"; device {compute.get('device', 'unknown')}, wall time "
         f"{compute.get('wall_time_s', 'unknown')} s, {compute.get('tokens_seen', 'unknown')} "
         "tokens seen"),
        ("Energy consumption", "Annex XI 2(e)",
         f"{kwh:.2e} kWh, {energy_method}" if kwh is not None else energy_method),
    ]
    copyright_policy = fields_.copyright_policy or None
    if not copyright_policy:
        todo.append("Copyright policy (Art. 53(1)(c)): set card.copyright_policy")
    summary = _summary(facts, need)
    art50 = _art50(facts)
    return Notes(role, gpai_note, items, kwh, energy_method, copyright_policy, summary, art50,
                 _process(facts), todo)


def _targets(config: dict[str, Any]) -> list[str]:
    targets = config.get("target_modules") or []
    return [targets] if isinstance(targets, str) else list(targets)


def _process(facts: Facts) -> str:
    m = facts.manifest
    if m is None:
        return "unknown (no manifest)"
    objective = {
        "sft": "supervised fine-tuning, cross-entropy on assistant tokens only",
        "dpo": "direct preference optimisation on chosen/rejected pairs",
        "orpo": "odds-ratio preference optimisation on chosen/rejected pairs (SFT loss on the "
        "chosen response plus an odds-ratio penalty; no reference model)",
        "kto": "Kahneman-Tversky optimisation on responses labelled desirable (chosen) or "
        "undesirable (rejected), against a frozen reference",
    }.get(m.method, m.method)
    quant = m.quantization or {}
    qtext = (
        f"QLoRA: base in 4-bit {quant.get('quant_type', 'nf4')}"
        f"{' with double quantisation' if quant.get('double_quant') else ''}, compute in "
        f"{quant.get('compute_dtype', 'unknown dtype')}"
        if quant.get("load_in_4bit") else "LoRA on an unquantised base"
    )
    return f"{objective}; {qtext}; every hyperparameter is listed under Training procedure"


def _data_line(facts: Facts) -> str:
    m = facts.manifest
    if m is None or not m.data:
        return "unknown (no manifest)"
    d = m.data
    dropped = d.get("dropped") or {}
    drop_text = ", ".join(f"{k}: {v}" for k, v in dropped.items()) or "none"
    return (
        f"{d.get('format', '?')} rows from {d.get('source', '?')} (sha256 {d.get('sha256', '?')}); "
        f"{d.get('rows_kept', '?')} of {d.get('rows_in', '?')} rows kept; dropped: {drop_text}; "
        f"PII: {_pii_text(d.get('pii'))}"
    )


def _pii_text(pii: Any) -> str:
    if not pii:
        return "no findings recorded"
    if isinstance(pii, dict):
        return ", ".join(f"{k}: {v}" for k, v in pii.items())
    return str(pii)


def _summary(facts: Facts, need: Any) -> list[tuple[str, str]]:
    m = facts.manifest
    f = facts.fields
    d = m.data if m else {}
    compute = m.compute if m else {}
    sections = [
        ("1.1 Provider identification", need(f.provider, "Provider name and contact",
                                             "card.provider")),
        ("1.2 Model identification",
         f"{facts.name or '(unnamed adapter)'}"
         + (f" version {facts.version}" if facts.version else "")
         + f", a modification (LoRA adapter) of {facts.base.hf_id or facts.base.name}, whose "
         "own provider's summary covers its pre-training data. Placed on the market: "
         + need(f.release, "Release date and distribution", "card.release")),
        ("1.3 Modalities, overall training data size and other characteristics",
         f"Text only. {d.get('rows_kept', 'an unknown number of')} training rows "
         f"({compute.get('tokens_seen', 'unknown')} tokens seen in training), language(s): "
         + need(", ".join(f.language), "Language(s) of the data", "card.language")
         + f". Source file {d.get('source', 'unknown')} (sha256 {d.get('sha256', 'unknown')})."),
    ]
    if f.data_sources:
        for key, heading in DATA_SOURCE_HEADINGS.items():
            text = f.data_sources.get(key) or "Not used (not listed in card.data_sources)."
            sections.append((heading, text))
    else:
        need("", "Data sources by category (summary section 2)", "card.data_sources")
        for heading in DATA_SOURCE_HEADINGS.values():
            sections.append((heading, "**To complete** (card.data_sources)"))
    sections += [
        ("3.1 Respect of reservation of rights from the text and data mining exception",
         need(f.rights_reservations, "Respect of TDM reservations", "card.rights_reservations")),
        ("3.2 Removal of illegal content",
         need(f.illegal_content, "Removal of illegal content", "card.illegal_content")),
        ("3.3 Other information", _curation(facts)),
    ]
    return sections


def _curation(facts: Facts) -> str:
    m = facts.manifest
    if m is None or not m.data:
        return "No curation record (no manifest)."
    d = m.data
    splits = d.get("splits") or {}
    split_text = ", ".join(f"{k} {v}" for k, v in splits.items()) or "not recorded"
    return (
        f"Rows were checked and deduplicated by `loradock data`; dropped: "
        f"{', '.join(f'{k} {v}' for k, v in (d.get('dropped') or {}).items()) or 'none'}; "
        f"PII handling: {_pii_text(d.get('pii'))}; splits: {split_text}."
    )


def _art50(facts: Facts) -> list[str]:
    who = f"`{facts.model}`"
    return [
        f"Tell users they are interacting with an AI system ({who}) at the latest at their first "
        "interaction, unless it is obvious from the context (Art. 50(1) and 50(5)); for example: "
        f"\"You are chatting with an AI assistant ({facts.name or 'this adapter'} on "
        f"{facts.base.hf_id or facts.base.name}). Its answers can be wrong.\"",
        "Mark generated text as AI-generated in a machine-readable way where technically "
        "feasible (Art. 50(2)); `loradock serve` adds no such marking itself, so the chat "
        "application must (e.g. a response header or metadata field).",
        "If generated text is published to inform the public on matters of public interest, "
        "disclose that it is AI-generated unless a person reviewed it and holds editorial "
        "responsibility (Art. 50(4)).",
        "These transparency obligations apply from 2 August 2026.",
    ]
