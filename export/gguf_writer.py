"""Write a Llama-family Hugging Face model as a GGUF file with the PyPI ``gguf`` package.

What llama.cpp needs from us, for ``LlamaForCausalLM`` (SmolLM2 is one):

- hyperparameters under ``llama.*`` (context, widths, heads, kv heads, rope base, rms eps, rope
  dimension = head dim);
- tensors under llama.cpp's names (``blk.N.attn_q.weight``...), mapped with gguf's own
  `gguf.get_tensor_name_map`; 2-D weights in the chosen type, 1-D norms always f32;
- q and k rows permuted from HF's rotate-half layout to llama.cpp's rotary layout (per head the
  two halves are interleaved; k uses the kv-head count) — see `permute_rotary`;
- tied embeddings: no ``output.weight`` (llama.cpp reuses ``token_embd``);
- the tokenizer (`export.gguf_tokenizer`) and the chat template.

Anything else is refused by name before a byte is written: other architectures, rope scaling
(llama3/yarn need extra tensors; lesson 8), biases, unknown tensors. A model is never
half-converted.

Where the job ends: writes one f32/f16 file. Quantisation is `export.quantize`; merging an adapter
is `export.merge`; publishing under the final name is the caller's (`hub.files.atomic_file`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from export.gguf_tokenizer import add_tokenizer, read_tokenizer
from hub.errors import InvalidInput, Unsupported

GgufDtype = Literal["f32", "f16"]
SUPPORTED_ARCHITECTURES: dict[str, str] = {"LlamaForCausalLM": "llama"}
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class LlamaHParams:
    """The hyperparameters llama.cpp's ``llama`` architecture reads."""

    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context_length: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    tied_embeddings: bool


def check_architecture(config: dict[str, Any]) -> str:
    """Return the GGUF architecture name for an HF ``config.json``.

    Raises:
        Unsupported: For any architecture other than those in `SUPPORTED_ARCHITECTURES`.
    """
    archs = config.get("architectures") or [config.get("model_type") or "unknown"]
    arch = str(archs[0])
    if arch not in SUPPORTED_ARCHITECTURES:
        raise Unsupported(
            f"Architecture {arch!r} cannot be exported to GGUF by loradock",
            fix=f"Supported: {', '.join(SUPPORTED_ARCHITECTURES)}. Use `loradock export merged` "
            "for an HF folder instead.",
            param="architecture",
        )
    return SUPPORTED_ARCHITECTURES[arch]


def llama_hparams(config: dict[str, Any]) -> LlamaHParams:
    """Read and check the hyperparameters of a Llama-family config.

    Raises:
        Unsupported: Architecture, rope scaling or biases llama.cpp's plain ``llama`` lacks.
    """
    check_architecture(config)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise Unsupported(
            f"Rope scaling {rope_type!r} is not supported by loradock's GGUF writer",
            fix="Only models with plain rotary embeddings (rope_type 'default') can be exported.",
            param="rope_scaling",
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise Unsupported(
                f"{flag}=true is not supported by loradock's GGUF writer",
                fix="Only bias-free Llama models can be exported.",
                param=flag,
            )
    n_head = int(config["num_attention_heads"])
    n_embd = int(config["hidden_size"])
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return LlamaHParams(
        n_layers=int(config["num_hidden_layers"]),
        n_embd=n_embd,
        n_ff=int(config["intermediate_size"]),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim=int(config.get("head_dim") or n_embd // n_head),
        context_length=int(config.get("max_position_embeddings") or 2048),
        rope_theta=float(theta),
        rms_eps=float(config.get("rms_norm_eps") or 1e-6),
        vocab_size=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings")),
    )


def permute_rotary(weight: Any, n_head: int) -> Any:
    """Reorder q/k projection rows from HF's rotate-half layout to llama.cpp's.

    HF keeps, per head, the first halves of all rotary pairs and then the second halves; llama.cpp
    rotates adjacent rows. Rows ``[h, half, i]`` become ``[h, i, half]``. Works on numpy arrays and
    torch tensors whose first dimension is ``n_head * head_dim`` (weights or LoRA B matrices).
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise InvalidInput(f"Cannot split {rows} rows into {n_head} rotary heads")
    grouped = weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def gguf_tensor_name(hf_name: str, n_layers: int) -> str | None:
    """Map an HF tensor name to llama.cpp's (None for tensors that are dropped)."""
    import gguf

    if hf_name.endswith(_SKIPPED_SUFFIXES):
        return None
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    return mapping.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def _numpy(tensor: Any) -> Any:
    import numpy as np

    if isinstance(tensor, np.ndarray):
        return tensor.astype(np.float32, copy=False)
    return tensor.detach().to("cpu").float().numpy()


def _same(a: Any, b: Any) -> bool:
    """True if two tensors (torch or numpy) hold identical values."""
    import numpy as np

    if a is b:
        return True
    return a.shape == b.shape and bool(np.array_equal(_numpy(a), _numpy(b)))


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, torch tensor)`` from every safetensors file of an HF folder."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise InvalidInput(
            f"{model_dir} has no .safetensors weights",
            fix="Save the model with save_pretrained(..., safe_serialization=True).",
        )
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


def convert_tensors(
    tensors: Mapping[str, Any] | Iterator[tuple[str, Any]], hp: LlamaHParams, dtype: GgufDtype
) -> Iterator[tuple[str, Any]]:
    """Yield ``(gguf name, numpy array)`` ready for the writer.

    Raises:
        Unsupported: A tensor llama.cpp's ``llama`` architecture has no place for.
    """
    import numpy as np

    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    embed = tensors.get("model.embed_tokens.weight") if isinstance(tensors, Mapping) else None
    for hf_name, tensor in items:
        if hf_name == "lm_head.weight" and hp.tied_embeddings and (
            embed is None or _same(tensor, embed)
        ):
            continue  # tied: llama.cpp reuses token_embd (a trained lm_head copy is kept)
        name = gguf_tensor_name(hf_name, hp.n_layers)
        if name is None and hf_name.endswith(_SKIPPED_SUFFIXES):
            continue
        if name is None:
            raise Unsupported(
                f"Tensor {hf_name!r} has no llama.cpp equivalent",
                fix="Only plain LlamaForCausalLM weights can be exported.",
            )
        array = _numpy(tensor)
        if name.endswith("attn_q.weight"):
            array = permute_rotary(array, hp.n_head)
        elif name.endswith("attn_k.weight"):
            array = permute_rotary(array, hp.n_head_kv)
        if dtype == "f16" and array.ndim > 1:
            array = array.astype(np.float16)
        yield name, np.ascontiguousarray(array)


def write_model_gguf(
    model_dir: Path,
    out: Path,
    *,
    dtype: GgufDtype = "f16",
    tensors: Mapping[str, Any] | None = None,
    chat_template: str | None = None,
    pre_tokenizer: str | None = None,
    name: str = "",
    license: str = "",
    progress: bool = False,
) -> LlamaHParams:
    """Write ``out`` from an HF folder's config and tokenizer and its (or the given) weights.

    Args:
        model_dir: HF folder (``config.json``, tokenizer files, weights unless ``tensors``).
        out: File to write (the caller publishes it atomically).
        dtype: ``f16`` or ``f32`` for 2-D weights; norms stay f32.
        tensors: HF-named weights to write instead of the folder's (e.g. a merged state dict).
        chat_template: Template to embed instead of the folder's.
        pre_tokenizer: llama.cpp pre-tokenizer name, when it cannot be recognised.
        name: ``general.name``.
        license: ``general.license`` (SPDX id).
        progress: Show a progress bar while writing tensors.

    Raises:
        Unsupported: Architecture, rope scaling, tokenizer or tensors llama.cpp cannot take.
    """
    import gguf

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    hp = llama_hparams(config)
    meta = read_tokenizer(
        model_dir, config, pre_tokenizer=pre_tokenizer, chat_template=chat_template
    )
    source = tensors if tensors is not None else iter_safetensors(model_dir)
    converted = list(convert_tensors(source, hp, dtype))
    if not any(n == "token_embd.weight" for n, _ in converted):
        raise Unsupported(f"{model_dir} has no embedding tensor", fix="Check the weights.")

    writer = gguf.GGUFWriter(str(out), SUPPORTED_ARCHITECTURES[config["architectures"][0]])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or config.get("_name_or_path") or model_dir.name)
        if license:
            writer.add_license(license)
        writer.add_context_length(hp.context_length)
        writer.add_embedding_length(hp.n_embd)
        writer.add_block_count(hp.n_layers)
        writer.add_feed_forward_length(hp.n_ff)
        writer.add_head_count(hp.n_head)
        writer.add_head_count_kv(hp.n_head_kv)
        writer.add_rope_freq_base(hp.rope_theta)
        writer.add_layer_norm_rms_eps(hp.rms_eps)
        writer.add_rope_dimension_count(hp.head_dim)
        if hp.head_dim != hp.n_embd // hp.n_head:
            writer.add_key_length(hp.head_dim)
            writer.add_value_length(hp.head_dim)
        writer.add_vocab_size(len(meta.tokens))
        writer.add_file_type(
            gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
        )
        add_tokenizer(writer, meta)
        for tensor_name, array in converted:
            writer.add_tensor(tensor_name, array)
        converted.clear()
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
    finally:
        writer.close()
    return hp
