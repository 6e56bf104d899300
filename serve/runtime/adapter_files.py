"""Read a registered PEFT LoRA folder into `AdapterWeights`, refusing what the engine cannot serve.

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (safetensors only, never pickle),
checks the files against the checksums recorded at registration, maps PEFT's tensor names
(``base_model.model.model.layers.3.self_attn.q_proj.lora_A[.NAME].weight``) onto the base's
fused projections (``(layer, "qkv")``, part 0; Phi-3's ``qkv_proj`` is the whole projection),
and folds each module's scaling into B: ``alpha / r``, or ``alpha / sqrt(r)``
with ``use_rslora``, where ``r`` and ``alpha`` come from ``rank_pattern`` / ``alpha_pattern``
when a pattern matches the module (PEFT's rule: the pattern matches the end of the module path).

Refused with `hub.errors.Unsupported` (the batched kernel adds ``x A^T B^T`` to linear layers and
nothing else): DoRA, ``modules_to_save``, LoRA on embeddings or lm_head, LoRA biases, aLoRA,
QA-LoRA, layer replication, trainable tokens, ``target_parameters``, and ranks over the engine's
cap.

Where the job ends: this module produces host tensors; putting them in slots is
`serve.runtime.lora` and `serve.runtime.adapter_cache`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub.errors import Incompatible, InvalidInput, NotAnAdapter, StoreCorrupt, Unsupported
from hub.manifest import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from serve.runtime.lora import AdapterWeights

if TYPE_CHECKING:
    import torch

    from hub.store import AdapterRecord
    from serve.runtime.weights import ModelWeights

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\."
    r"(?P<leaf>[a-z_]+))\.(?P<part>lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
# adapter_config.json fields whose non-default values change the math the kernel does.
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-hash")
_REFUSED_FIELDS = {
    "use_dora": "DoRA adapters",
    "lora_bias": "LoRA biases (lora_bias=true)",
    "alora_invocation_tokens": "aLoRA adapters",
    "use_qalora": "QA-LoRA adapters",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on parameters, not modules)",
    "modules_to_save": "modules_to_save (full copies of modules)",
    "fan_in_fan_out": "fan_in_fan_out",
}


def check_capabilities(record: AdapterRecord, max_rank: int) -> None:
    """Refuse early, from the registered capabilities, what `read_adapter` would refuse.

    Raises:
        Unsupported: DoRA, modules_to_save, embedding LoRA, or rank over ``max_rank``.
    """
    caps = record.capabilities
    key = f"{record.name}@{record.version}"
    problems = []
    if caps.use_dora:
        problems.append("it is a DoRA adapter")
    if caps.modules_to_save:
        problems.append(f"it has modules_to_save={caps.modules_to_save}")
    if caps.targets_embeddings:
        problems.append("it puts LoRA on embed_tokens/lm_head")
    if caps.rank > max_rank:
        problems.append(f"its rank {caps.rank} is over max_lora_rank={max_rank}")
    if problems:
        raise Unsupported(
            f"The peft engine cannot serve adapter {key}: {'; '.join(problems)}",
            fix="Retrain it as a plain LoRA on linear layers (the default `loradock train` "
            "recipe), or raise --max-lora-rank if only the rank is too high.",
            param="model",
        )


def read_adapter(
    record: AdapterRecord,
    layout: ModelWeights,
    leaves: dict[str, tuple[str, int]],
    *,
    max_rank: int,
    dtype: torch.dtype,
    verify: bool = True,
) -> AdapterWeights:
    """Load ``record``'s LoRA tensors onto the base's fused projections.

    Args:
        record: The registered adapter version.
        layout: The base's fused weights (parts, input widths, the q/k RoPE layout).
        leaves: PEFT target leaf -> (projection, part) (`FamilySpec.lora_leaves`).
        max_rank: Largest rank accepted.
        dtype: Dtype of the returned tensors.
        verify: Re-hash the files against the checksums recorded at registration.

    Raises:
        StoreCorrupt: Files changed since registration.
        NotAnAdapter: Missing or unreadable files.
        Unsupported: Features the engine cannot serve (see the module docstring).
        Incompatible: Shapes or ranks that do not fit the base or the config.
        InvalidInput: Non-finite values.
    """
    key = f"{record.name}@{record.version}"
    check_capabilities(record, max_rank)
    folder = Path(record.path)
    config_bytes = _read_bytes(record, folder, ADAPTER_CONFIG_FILE)
    weights_bytes = _read_bytes(record, folder, ADAPTER_WEIGHTS_FILE)
    # Hash on another thread (hashlib releases the GIL) while the tensors are converted; the
    # result is checked before anything is returned, so a changed file is never installed.
    files = {ADAPTER_CONFIG_FILE: config_bytes, ADAPTER_WEIGHTS_FILE: weights_bytes}
    checks = _HASHER.submit(_verify, record, files) if verify else None
    try:
        weights = convert(key, config_bytes, weights_bytes, layout, leaves, max_rank=max_rank,
                          dtype=dtype)
    except InvalidInput:
        if checks is not None:
            checks.result()  # a changed file is reported as such, not as bad values
        raise
    if checks is not None:
        checks.result()
    return weights


def convert(key: str, config_bytes: bytes, weights_bytes: bytes, layout: ModelWeights,
            leaves: dict[str, tuple[str, int]], *, max_rank: int, dtype: torch.dtype,
            ) -> AdapterWeights:
    """An adapter's file contents as `AdapterWeights` (`read_adapter` without files or hashes).

    Raises:
        As `read_adapter`, but `hub.errors.StoreCorrupt`.
    """
    import torch
    from safetensors.torch import load as load_safetensors

    config = _parse_config(config_bytes, key)
    tensors = load_safetensors(weights_bytes)
    if not _all_finite(weights_bytes, tensors):
        raise InvalidInput(f"Adapter {key} has NaN or inf weights",
                           fix="Retrain or re-export the adapter.", param="model")
    num_layers = len(layout.layers)
    pairs: dict[tuple[int, str], dict[str, Any]] = {}
    for name, tensor in tensors.items():
        match = _KEY.match(name)
        if match is None or match["leaf"] not in leaves or int(match["layer"]) >= num_layers:
            raise Unsupported(
                f"Adapter {key} has tensor {name!r}, which the peft engine cannot apply",
                fix=f"Serve adapters that put LoRA only on {', '.join(leaves)}.",
                param="model",
            )
        slot = pairs.setdefault((int(match["layer"]), match["leaf"]), {"module": match["module"]})
        slot[match["part"]] = tensor
    if not pairs:
        raise NotAnAdapter(f"Adapter {key} holds no LoRA tensors", fix="Register it again.")
    ranks = [parts["lora_A"].shape[0] for parts in pairs.values() if "lora_A" in parts]
    rank = max(ranks or [0])
    if rank > max_rank:
        raise Unsupported(f"Adapter {key}: rank {rank} is over max_lora_rank={max_rank}",
                          fix="Raise --max-lora-rank.", param="model")
    modules: dict[tuple[int, str], tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for (layer, leaf), parts in sorted(pairs.items()):
        projection, part = leaves[leaf]
        a, b = _checked_pair(key, parts, layout.in_features[projection],
                             layout.parts[projection][part][1])
        scaling = module_scaling(config, parts["module"], a.shape[0], key)
        if (layer, projection) not in modules:
            sizes = [size for _, size in layout.parts[projection]]
            modules[(layer, projection)] = (
                torch.zeros(len(sizes) * rank, a.shape[1], dtype=dtype),
                [torch.zeros(rank, size, dtype=dtype) for size in sizes])
        a_all, bts = modules[(layer, projection)]
        r = a.shape[0]
        a_all[part * rank:part * rank + r].copy_(a)
        bt = layout.permute_out(projection, part, (b * scaling).T)
        bts[part][:r].copy_(bt)
    return AdapterWeights(modules=modules, rank=rank, file_bytes=len(weights_bytes))


def warm_reader(layout: ModelWeights, leaves: dict[str, tuple[str, int]], rank: int,
                dtype: torch.dtype) -> None:
    """Convert a zero rank-``rank`` adapter on every leaf in memory, and hash it; keep nothing.

    Run once at start on the loader thread: the first real load then finds that thread's heap
    grown to an adapter's size, its torch ops and the hashing thread started. Without it the
    first load after start took 120-165 ms here and later ones 17-35 ms.
    """
    import torch
    from safetensors.torch import save

    tensors = {}
    for layer in range(len(layout.layers)):
        for leaf, (projection, part) in leaves.items():
            block = "self_attn" if projection in ("qkv", "o") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{leaf}"
            tensors[f"{prefix}.lora_A.weight"] = torch.zeros(rank, layout.in_features[projection])
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(layout.parts[projection][part][1],
                                                             rank)
    data = save(tensors)
    del tensors
    # A real load holds the file's bytes, read on this thread, while it converts. Without this
    # stand-in the first real read took this thread's heap up to new pages and faulted them in
    # (50 ms of a 70 ms first load against 3 ms for the same read later, on AVX2 with fp32).
    held = bytearray(len(data))
    hashed = _HASHER.submit(lambda: hashlib.sha256(data).hexdigest())
    convert("warm-up", json.dumps({"r": rank, "lora_alpha": rank}).encode(), data, layout,
            leaves, max_rank=rank, dtype=dtype)
    hashed.result()
    del held


def _checked_pair(key: str, parts: dict[str, Any], in_f: int, out_f: int,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both LoRA matrices of one module in fp32, checked for shape and finiteness."""
    import torch

    a, b = parts.get("lora_A"), parts.get("lora_B")
    if a is None or b is None:
        raise Incompatible(f"Adapter {key}: {parts['module']} has only one of lora_A/lora_B",
                           fix="Re-save the adapter with PEFT's save_pretrained().")
    rank = a.shape[0]
    if a.shape != (rank, in_f) or b.shape != (out_f, rank):
        raise Incompatible(
            f"Adapter {key}: {parts['module']} has lora_A {list(a.shape)} and lora_B "
            f"{list(b.shape)}; the base needs [r, {in_f}] and [{out_f}, r]",
            fix="Use the adapter with the base it was trained on.",
            param="model",
        )
    return a.to(torch.float32), b.to(torch.float32)


def module_scaling(config: dict[str, Any], module: str, rank: int, key: str = "") -> float:
    """PEFT's scaling for ``module``: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

    ``r`` and ``alpha`` come from the first ``rank_pattern`` / ``alpha_pattern`` key matching
    ``module``, else from ``r`` / ``lora_alpha``. The resulting ``r`` must equal the tensor rank.

    Raises:
        Incompatible: The config's rank for the module differs from the tensor's.
    """
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module,
                           config.get("lora_alpha", r))
    if int(r) != rank:
        raise Incompatible(
            f"Adapter {key}: {module} has rank {rank} in its weights but r={r} in its config",
            fix="Re-save the adapter with PEFT's save_pretrained().",
        )
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _parse_config(data: bytes, key: str) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotAnAdapter(f"Adapter {key}: {ADAPTER_CONFIG_FILE} is not valid JSON ({exc})",
                           fix="Register the adapter again.") from exc
    if not isinstance(config, dict):
        raise NotAnAdapter(f"Adapter {key}: {ADAPTER_CONFIG_FILE} is not a JSON object",
                           fix="Register the adapter again.")
    refused = [label for field_, label in _REFUSED_FIELDS.items() if config.get(field_)]
    if refused:
        raise Unsupported(
            f"The peft engine cannot serve adapter {key}: it uses {', '.join(refused)}",
            fix="Retrain it as a plain LoRA on linear layers (the default `loradock train` "
            "recipe).",
            param="model",
        )
    return config


def _read_bytes(record: AdapterRecord, folder: Path, rel: str) -> bytes:
    """Read one file of the adapter."""
    try:
        return (folder / rel).read_bytes()
    except OSError as exc:
        raise StoreCorrupt(f"Adapter {record.name}@{record.version}: cannot read {rel} ({exc})",
                           fix=_reregister_fix(record)) from exc


def _reregister_fix(record: AdapterRecord) -> str:
    return (f"Remove it (`loradock hub rm {record.name}@{record.version}`) and register it "
            "again.")


def _verify(record: AdapterRecord, files: dict[str, bytes]) -> None:
    """Check each file against the sha256 recorded at registration."""
    for rel, data in files.items():
        if record.files.get(rel) != hashlib.sha256(data).hexdigest():
            raise StoreCorrupt(
                f"Adapter {record.name}@{record.version}: {rel} has changed since registration",
                fix=_reregister_fix(record),
            )


def _all_finite(data: bytes, tensors: dict[str, torch.Tensor]) -> bool:
    """No NaN or inf anywhere: one pass over the file's data block when it has one dtype.

    A NaN or inf element makes the sum NaN or inf, so a finite sum proves every element
    finite; only a non-finite sum (a bad value, or an overflow of large finite ones) needs the
    element-wise check. The sum took 0.35 ms on a rank-16 all-linear SmolLM2 adapter (4.9 M
    values), ``isfinite(...).all()`` 7 ms alone and up to 67 ms beside the hashing thread.
    """
    import warnings

    import torch

    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1 and next(iter(dtypes)).is_floating_point:
        header = 8 + int.from_bytes(data[:8], "little")
        with warnings.catch_warnings():  # read-only view of the file's bytes, no copy
            warnings.simplefilter("ignore", UserWarning)
            block = torch.frombuffer(data, dtype=next(iter(dtypes)), offset=header)
        blocks = [block]
    else:
        blocks = [t for t in tensors.values() if t.is_floating_point()]
    return all(bool(torch.isfinite(b.sum())) or bool(torch.isfinite(b).all()) for b in blocks)
