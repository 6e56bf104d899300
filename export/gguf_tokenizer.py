"""Tokenizer metadata for GGUF files: vocabulary, token types, merges, special ids, pre-tokenizer.

llama.cpp re-implements the tokenizer from GGUF metadata, so every field must say exactly what the
Hugging Face ``tokenizer.json`` does: a wrong token type makes control tokens print as text, a
wrong pre-tokenizer name silently splits digits or spaces differently. The parity check
(`export.parity`) compares llama.cpp's tokenisation of every prompt with the HF ids.

Supported: byte-level BPE (``tokenizer.ggml.model = gpt2``). The llama.cpp pre-tokenizer name is
recognised by a table of rules over the vocabulary and the HF pre-tokenizer (llama.cpp itself
recognises tokenizers by hashing their output on a test text; we do not copy that table). An
unrecognised tokenizer is refused unless the caller names the pre-tokenizer.

Where the job ends: reads the HF folder and adds keys to a `gguf.GGUFWriter`; writing tensors and
hyperparameters is `export.gguf_writer`'s job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.errors import Unsupported
from hub.manifest import CHAT_TEMPLATE_FILE

# gguf.TokenType values (kept as ints so this module does not need gguf at import time).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class TokenizerMeta:
    """Everything llama.cpp needs to rebuild a byte-level BPE tokenizer.

    Attributes:
        pre: llama.cpp pre-tokenizer name (``smollm``, ``llama-bpe``, ``gpt-2``...).
        tokens: Token strings by id (byte-level encoded, as in ``tokenizer.json``).
        token_types: `NORMAL`, `CONTROL`, `USER_DEFINED` or `UNUSED` per id.
        merges: BPE merges as ``"left right"`` strings, in rank order.
        special_ids: ``{"bos"|"eos"|"unk"|"pad": id}`` for the ones the tokenizer defines.
        add_bos: Whether the tokenizer prepends BOS when encoding text.
        add_eos: Whether it appends EOS.
        chat_template: Jinja chat template, if any.
    """

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


@dataclass(frozen=True)
class PreTokenizerRule:
    """One row of the pre-tokenizer table: a llama.cpp name and how we recognise it."""

    name: str
    why: str
    matches: Callable[[dict[str, Any], dict[str, int]], bool]


def _byte_level(tj: dict[str, Any]) -> bool:
    """True if the HF pre-tokenizer is byte-level (alone or after a digit split)."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _only_byte_level(tj: dict[str, Any]) -> bool:
    pre = tj.get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


PRE_TOKENIZER_RULES: tuple[PreTokenizerRule, ...] = (
    PreTokenizerRule(
        "smollm",
        "SmolLM vocabulary (<|im_start|> at id 1, <repo_name> at id 3) with byte-level BPE",
        lambda tj, vocab: vocab.get("<|im_start|>") == 1
        and vocab.get("<repo_name>") == 3
        and _byte_level(tj),
    ),
    PreTokenizerRule(
        "llama-bpe",
        "Llama-3 vocabulary (<|begin_of_text|> at id 128000) with byte-level BPE",
        lambda tj, vocab: vocab.get("<|begin_of_text|>") == 128000 and _byte_level(tj),
    ),
    PreTokenizerRule(
        "gpt-2",
        "GPT-2 vocabulary (<|endoftext|> at id 50256) with the plain GPT-2 byte-level split",
        lambda tj, vocab: vocab.get("<|endoftext|>") == 50256 and _only_byte_level(tj),
    ),
)


def identify_pre_tokenizer(tj: dict[str, Any], vocab: dict[str, int]) -> str:
    """Return llama.cpp's pre-tokenizer name for a ``tokenizer.json``.

    Raises:
        Unsupported: If no rule of `PRE_TOKENIZER_RULES` matches.
    """
    for rule in PRE_TOKENIZER_RULES:
        if rule.matches(tj, vocab):
            return rule.name
    pre = json.dumps(tj.get("pre_tokenizer"))[:120]
    known = ", ".join(f"{r.name} ({r.why})" for r in PRE_TOKENIZER_RULES)
    raise Unsupported(
        f"Cannot recognise the tokenizer's llama.cpp pre-tokenizer (HF pre_tokenizer {pre})",
        fix=f"Pass --pre-tokenizer NAME with llama.cpp's name for it; recognised: {known}.",
        param="pre_tokenizer",
    )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _adds_special(tj: dict[str, Any], which: str, token: str | None) -> bool:
    """Whether the HF post-processor inserts ``token`` (``first`` or ``last``) when encoding."""
    post = tj.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") != "TemplateProcessing":
            continue
        single = step.get("single") or []
        items = single[:1] if which == "first" else single[-1:]
        for item in items:
            special = item.get("SpecialToken")
            if special and (token is None or special.get("id") == token):
                return True
    return False


def read_tokenizer(
    model_dir: Path,
    config: dict[str, Any],
    *,
    pre_tokenizer: str | None = None,
    chat_template: str | None = None,
) -> TokenizerMeta:
    """Read an HF folder's tokenizer into GGUF terms.

    Args:
        model_dir: Folder with ``tokenizer.json`` and ``tokenizer_config.json``.
        config: The model's ``config.json`` (vocab size and fallback special ids).
        pre_tokenizer: llama.cpp pre-tokenizer name; recognised from the tokenizer when None.
        chat_template: Template to embed; the folder's own when None.

    Raises:
        Unsupported: Not a byte-level BPE tokenizer, or an unrecognised pre-tokenizer.
    """
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise Unsupported(
            f"{model_dir} has no tokenizer.json (slow/SentencePiece-only tokenizers are not "
            "supported)",
            fix="Save the tokenizer with a fast (tokenizers) backend first.",
        )
    tj = json.loads(path.read_text())
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(tj):
        raise Unsupported(
            f"Tokenizer model {model.get('type')!r} with pre-tokenizer "
            f"{(tj.get('pre_tokenizer') or {}).get('type')!r} is not byte-level BPE",
            fix="Only byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama-3) can be exported.",
        )
    tok_config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text()) if tok_config_path.is_file() else {}
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {int(t["id"]): t for t in tj.get("added_tokens", [])}
    for tid, tok in added.items():
        vocab[tok["content"]] = tid
    size = max(int(config.get("vocab_size") or 0), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, tid in vocab.items():
        tokens[tid] = text
        types[tid] = NORMAL
    for tid, tok in added.items():
        types[tid] = CONTROL if tok.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    special_ids: dict[str, int] = {}
    for key in ("bos", "eos", "unk", "pad"):
        text = _token_text(tok_config.get(f"{key}_token"))
        if text is not None and text in vocab:
            special_ids[key] = vocab[text]
        elif isinstance(config.get(f"{key}_token_id"), int):
            special_ids[key] = int(config[f"{key}_token_id"])
    bos_text = _token_text(tok_config.get("bos_token"))
    eos_text = _token_text(tok_config.get("eos_token"))
    add_bos = tok_config.get("add_bos_token")
    add_eos = tok_config.get("add_eos_token")

    if chat_template is None:
        template_file = model_dir / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            chat_template = template_file.read_text()
        elif isinstance(tok_config.get("chat_template"), str):
            chat_template = tok_config["chat_template"]
    return TokenizerMeta(
        pre=pre_tokenizer or identify_pre_tokenizer(tj, vocab),
        tokens=tokens,
        token_types=types,
        merges=merges,
        special_ids=special_ids,
        add_bos=bool(add_bos) if add_bos is not None else _adds_special(tj, "first", bos_text),
        add_eos=bool(add_eos) if add_eos is not None else _adds_special(tj, "last", eos_text),
        chat_template=chat_template,
    )


def add_tokenizer(writer: Any, meta: TokenizerMeta) -> None:
    """Add ``meta`` to a `gguf.GGUFWriter` under llama.cpp's ``tokenizer.*`` keys."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.token_types)
    writer.add_token_merges(meta.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, token_id in meta.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(meta.add_bos)
    writer.add_add_eos_token(meta.add_eos)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)
