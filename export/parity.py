"""The parity gate: does an exported model still behave like the PEFT adapter on the unmerged base?

The reference is the adapter applied with PEFT on the fp32 base (what the hub serves). For each
prompt (chat template applied, as in training) it generates greedily; then every candidate (a
merged HF model, a GGUF file in llama.cpp, the base GGUF plus a GGUF LoRA) is run teacher-forced
over the same tokens, and we count positions where its top-1 next token equals the reference's
(agreement), and the mean |Δlogit|. Teacher forcing keeps one early divergence from counting every
later token as wrong. For GGUF files we also check that llama.cpp tokenises every prompt into the
same ids as the HF tokenizer, and let it answer freely (greedy) to show it answers.

Thresholds per format live in `export.config.DEFAULT_THRESHOLDS`; `enforce` raises `ParityFailed`
unless verification is off.

Where the job ends: numbers and a verdict. Loading models is `export.merge`; writing files and
publishing them is `export.pipeline`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.config import ParityFailed
from hub.manifest import AdapterManifest

BUNDLED_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "What is 12 + 30? Answer with the number only.",
    "Give me three tips for better sleep.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "List two uses of a paperclip.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What does a compiler do?",
    "Suggest a name for a café that sells crêpes.",
    "How many legs does a spider have?",
)


@dataclass
class Reference:
    """Greedy outputs and logits of the PEFT adapter on the unmerged base.

    Attributes:
        prompts: User prompts.
        texts: Prompts with the chat template applied (what gets tokenised).
        prompt_ids: HF token ids of ``texts``.
        generated: Greedy continuation ids (stops at an end token or ``max_tokens``).
        logits: Per prompt, the reference logits predicting each generated token.
    """

    prompts: list[str]
    texts: list[str]
    prompt_ids: list[list[int]]
    generated: list[list[int]]
    logits: list[Any]

    @property
    def sequences(self) -> list[list[int]]:
        """Prompt + generated ids per prompt."""
        return [p + g for p, g in zip(self.prompt_ids, self.generated, strict=True)]

    @property
    def starts(self) -> list[int]:
        """Prompt lengths."""
        return [len(p) for p in self.prompt_ids]


@dataclass
class ParityReport:
    """One candidate measured against the reference.

    Attributes:
        kind: Output format (``f16``, ``q8_0``, ``q4_k_m``, ``fp32``, ``lora``...).
        target: What was measured (a file name or description).
        prompts: Number of prompts.
        positions: Generated positions compared.
        agreement: Share of positions with the same top-1 token (teacher-forced).
        mean_abs_dlogit: Mean |logit difference| over positions and vocabulary.
        threshold: Minimum agreement required.
        passed: ``agreement >= threshold`` and no tokenizer mismatch.
        greedy_identical: Prompts whose free greedy output equals the reference (GGUF only).
        tokenizer_mismatches: Prompts llama.cpp tokenises differently from HF (GGUF only).
        sample: The candidate's greedy answer to the first prompt.
        seconds: Time taken.
    """

    kind: str
    target: str
    prompts: int
    positions: int
    agreement: float
    mean_abs_dlogit: float
    threshold: float
    passed: bool
    greedy_identical: int | None = None
    tokenizer_mismatches: list[int] = field(default_factory=list)
    sample: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)

    def line(self) -> str:
        """One line for the CLI and test output."""
        verdict = "ok" if self.passed else "FAIL"
        extra = ""
        if self.greedy_identical is not None:
            extra = f", greedy identical {self.greedy_identical}/{self.prompts}"
        if self.tokenizer_mismatches:
            extra += f", tokenizer mismatches on prompts {self.tokenizer_mismatches}"
        return (
            f"parity {self.kind} ({self.target}): top-1 agreement {self.agreement:.1%} over "
            f"{self.positions} tokens / {self.prompts} prompts, mean |dlogit| "
            f"{self.mean_abs_dlogit:.4f}{extra} (threshold {self.threshold:.0%}: {verdict})"
        )


def pick_prompts(manifest: AdapterManifest | None, count: int) -> list[str]:
    """The manifest's eval prompts first (``extra.eval_prompts``), then bundled ones."""
    chosen: list[str] = []
    if manifest is not None:
        for key in ("eval_prompts", "prompts"):
            found = manifest.extra.get(key)
            if isinstance(found, list):
                chosen += [p for p in found if isinstance(p, str) and p.strip()]
    for prompt in BUNDLED_PROMPTS:
        if prompt not in chosen:
            chosen.append(prompt)
    return chosen[:count]


def build_reference(loaded: Any, prompts: list[str], max_tokens: int) -> Reference:
    """Generate greedily with the PEFT model in ``loaded`` (an `export.merge.LoadedAdapter`)."""
    import torch

    from export.templates import render_chat

    tok = loaded.tokenizer
    special = {"bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}
    stop_ids = {i for i in (tok.eos_token_id,) if i is not None}
    gen_eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    stop_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos else [])
    texts, prompt_ids, generated = [], [], []
    for prompt in prompts:
        text = render_chat(loaded.chat_template, [{"role": "user", "content": prompt}],
                           add_generation_prompt=True, **special)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = loaded.model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=sorted(stop_ids) or None,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            )
        texts.append(text)
        prompt_ids.append(list(ids))
        generated.append(out[0, len(ids):].tolist())
    ref = Reference(list(prompts), texts, prompt_ids, generated, [])
    ref.logits = forward_logits(loaded.model, ref.sequences, ref.starts)
    return ref


def forward_logits(model: Any, sequences: list[list[int]], starts: list[int]) -> list[Any]:
    """Teacher-forced logits of an HF model at the positions predicting each generated token."""
    import torch

    result = []
    with torch.no_grad():
        for seq, start in zip(sequences, starts, strict=True):
            logits = model(input_ids=torch.tensor([seq])).logits[0].float()
            result.append(logits[start - 1 : len(seq) - 1].numpy())
    return result


def compare_logits(a: list[Any], b: list[Any]) -> tuple[float, float, float, int]:
    """Top-1 agreement, mean and max |Δlogit|, and position count between two logit lists."""
    import numpy as np

    same = total = 0
    abs_sum = 0.0
    abs_max = 0.0
    values = 0
    for x, y in zip(a, b, strict=True):
        if len(x) == 0:
            continue
        same += int((x.argmax(-1) == y.argmax(-1)).sum())
        total += len(x)
        diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
        abs_sum += float(diff.sum())
        abs_max = max(abs_max, float(diff.max()))
        values += diff.size
    return (same / total if total else 1.0), (abs_sum / values if values else 0.0), abs_max, total


def score(kind: str, target: str, reference: Reference, logits: list[Any],
          threshold: float, started: float, **extra: Any) -> ParityReport:
    """Build a `ParityReport` from a candidate's teacher-forced logits."""
    import numpy as np

    same = total = 0
    for ref_ids, cand in zip(reference.generated, logits, strict=True):
        if len(ref_ids) == 0:
            continue
        same += int((cand.argmax(-1) == np.asarray(ref_ids)).sum())
        total += len(ref_ids)
    agreement = same / total if total else 1.0
    _, mean_abs, _, _ = compare_logits(reference.logits, logits)
    report = ParityReport(
        kind=kind,
        target=target,
        prompts=len(reference.prompts),
        positions=total,
        agreement=agreement,
        mean_abs_dlogit=mean_abs,
        threshold=threshold,
        passed=False,
        seconds=round(time.monotonic() - started, 2),
        **extra,
    )
    report.passed = agreement >= threshold and not report.tokenizer_mismatches
    return report


def hf_parity(model: Any, reference: Reference, *, kind: str, target: str,
              threshold: float) -> ParityReport:
    """Measure an HF model (e.g. the merged one) against the reference."""
    started = time.monotonic()
    logits = forward_logits(model, reference.sequences, reference.starts)
    return score(kind, target, reference, logits, threshold, started)


def gguf_parity(path: Path, reference: Reference, *, kind: str, threshold: float,
                lora_path: Path | None = None, threads: int = 0) -> ParityReport:
    """Load a GGUF with llama-cpp-python (optionally with a GGUF LoRA) and measure it."""
    import numpy as np

    from export.quantize import import_llama_cpp

    started = time.monotonic()
    llama_cpp = import_llama_cpp()
    longest = max(len(s) for s in reference.sequences)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=max(64, longest + 8),
        n_batch=max(64, longest + 8),
        logits_all=True,
        verbose=False,
        n_threads=threads or None,
        lora_path=str(lora_path) if lora_path else None,
    )
    try:
        mismatches, logits, identical, sample = [], [], 0, ""
        for i, (text, ids, gen) in enumerate(
            zip(reference.texts, reference.prompt_ids, reference.generated, strict=True)
        ):
            if llm.tokenize(text.encode(), add_bos=False, special=True) != ids:
                mismatches.append(i)
            seq = ids + gen
            llm.reset()
            llm.eval(seq[:-1] if gen else seq)
            logits.append(np.array(llm.scores[len(ids) - 1 : len(seq) - 1], dtype=np.float32))
            free = _greedy(llm, ids, len(gen) or 1)
            identical += int(free == gen)
            if i == 0:
                sample = llm.detokenize(free).decode("utf-8", errors="replace")
    finally:
        llm.close()
    target = Path(path).name + (f" + {Path(lora_path).name}" if lora_path else "")
    return score(kind, target, reference, logits, threshold, started,
                 greedy_identical=identical, tokenizer_mismatches=mismatches, sample=sample)


def _greedy(llm: Any, ids: list[int], limit: int) -> list[int]:
    """Free greedy generation with llama.cpp, stopping at its end-of-generation tokens."""
    import llama_cpp

    out: list[int] = []
    llm.reset()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, reset=True):
        out.append(int(token))
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(out) >= limit:
            break
    return out


def enforce(report: ParityReport, verify: bool) -> ParityReport:
    """Raise `ParityFailed` when ``report`` did not pass and ``verify`` is on."""
    if verify and not report.passed:
        why = (
            f"llama.cpp tokenises prompts {report.tokenizer_mismatches} differently from the HF "
            "tokenizer" if report.tokenizer_mismatches
            else f"top-1 agreement {report.agreement:.1%} is under the threshold "
            f"{report.threshold:.0%}"
        )
        raise ParityFailed(
            f"Export {report.target} ({report.kind}) failed its parity check: {why}",
            fix="Use a less lossy format (f16/q8_0), lower --threshold, or pass --no-verify to "
            "keep it anyway.",
            param="quant",
        )
    return report
