"""Base models from the Hugging Face Hub: plan, download (resumable), describe, register.

``ORG/NAME[@REVISION]`` is resolved to a commit sha first (`plan`); the repo's file list is read
before anything is fetched, and a repo without safetensors weights is refused there (pickle
weights are named and never fetched). Only the files a base needs are downloaded
(`ALLOW_PATTERNS`: safetensors, config, tokenizer, chat template, generation config and the
card for its licence), into a ``.partial-*`` folder under ``$LORADOCK_HOME/bases`` that a rerun
resumes (huggingface_hub's ``local_dir`` mode keeps the part-files), then renamed to its final
folder named by repo and commit. Only then is the base recorded (`Store.add_base`), so a
failure at any step (gated repo, missing revision, cap, full disk, rejected architecture)
leaves nothing registered.

The endpoint comes from ``HF_ENDPOINT`` and the token from ``HF_TOKEN`` (never printed).

Where the job ends: this module fetches and describes; which architectures an engine can serve
is the caller's rule, passed in as ``check_config`` (hub does not import serve).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.bases import TOKENIZER_FILES, BaseInfo
from hub.errors import InvalidInput, LoradockError, NotFound, RemoteError, UnsafeWeights
from hub.files import is_pickle_name
from hub.names import validate_name

ALLOW_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", *TOKENIZER_FILES,
    "tokenizer.model", "vocab.json", "merges.txt", "README.md",
)
DEFAULT_MAX_GB = 20.0
PARTIAL_PREFIX = ".partial-"
_SPEC = re.compile(r"^([A-Za-z0-9][\w.-]*)/([\w.-]+)(?:@([\w./-]+))?$")
_TOKENS = re.compile(
    r"(\d+(?:\.\d+)?)\s*(T|B|trillion|billion)\s+(?:high[- ]quality\s+)?tokens", re.IGNORECASE)


class DiskFull(LoradockError):
    """The disk cannot hold, or filled up while receiving, a download."""

    http_status = 507
    code = "disk_full"
    exit_code = 5


@dataclass
class BasePlan:
    """What `download` will fetch, known before any weight is.

    Attributes:
        repo_id: ``ORG/NAME``.
        revision: What the user asked for (branch, tag or commit; ``main`` by default).
        sha: The commit ``revision`` resolved to (recorded as the base's revision).
        files: ``{file name: size in bytes}`` of the allowed files.
        skipped: Files in the repo that are not fetched (pickle weights, other formats).
        gated: The repo's gating (``manual``/``auto``) or ``""``.
        license: The licence from the Hub's card data, when it has one.
    """

    repo_id: str
    revision: str
    sha: str
    files: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    gated: str = ""
    license: str = ""

    @property
    def total_bytes(self) -> int:
        """Bytes of every file to fetch."""
        return sum(self.files.values())


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split ``ORG/NAME[@REVISION]``.

    Raises:
        InvalidInput: If ``spec`` is not of that form.
    """
    match = _SPEC.match(spec)
    if not match or ".." in spec:
        raise InvalidInput(
            f"{spec!r} is neither a local folder nor a Hub id ORG/NAME[@REVISION]",
            fix="Pass an existing folder, or e.g. Qwen/Qwen2.5-1.5B-Instruct@main.",
            param="source",
        )
    return f"{match.group(1)}/{match.group(2)}", match.group(3)


def looks_like_hub_id(spec: str) -> bool:
    """True if ``spec`` has the form ``ORG/NAME[@REVISION]``."""
    return bool(_SPEC.match(spec))


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None,
                 token=os.environ.get("HF_TOKEN") or None)


def _gated_error(repo_id: str) -> RemoteError:
    has_token = bool(os.environ.get("HF_TOKEN"))
    return RemoteError(
        f"{repo_id} is a gated repo and "
        + ("this HF_TOKEN has not been granted access" if has_token else "no HF_TOKEN is set"),
        fix=f"Accept its licence on https://huggingface.co/{repo_id}, then set HF_TOKEN to a "
        "read token of that account.",
    )


def _hub_error(repo_id: str, revision: str, exc: Exception) -> LoradockError:
    """One clear error for a failed Hub call (the token is never part of it)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return _gated_error(repo_id)
    if isinstance(exc, RevisionNotFoundError):
        return NotFound(f"Revision {revision!r} does not exist in {repo_id}",
                        fix="Use a branch, tag or commit sha the repo has (default: main).",
                        param="revision")
    if isinstance(exc, RepositoryNotFoundError):
        return NotFound(f"No model repo {repo_id!r} on the Hub (or it is private), and no "
                        "local folder of that name",
                        fix="Check the id or the path; for a private repo set HF_TOKEN.",
                        param="source")
    if isinstance(exc, OfflineModeIsEnabled):
        return RemoteError(f"Cannot reach the Hub for {repo_id}: HF_HUB_OFFLINE is set",
                           fix="Set HF_HUB_OFFLINE=0, or pass a folder downloaded elsewhere.")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return RemoteError(f"The Hub refused the credentials for {repo_id} (HTTP 401)",
                           fix="Set HF_TOKEN to a valid read token, or unset it for public repos.")
    detail = f"HTTP {status}" if status else type(exc).__name__
    return RemoteError(f"Could not download {repo_id}@{revision} ({detail})",
                       fix="Check the network, HF_ENDPOINT and HF_TOKEN, then rerun (it resumes).")


def _allowed(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatch(name, p) for p in ALLOW_PATTERNS)


def plan(repo_id: str, revision: str | None = None) -> BasePlan:
    """Resolve ``revision`` to a commit and list what would be fetched (no weight is fetched).

    Raises:
        NotFound: No such repo or revision.
        RemoteError: Gated repo without access, or the Hub failing.
        UnsafeWeights: The repo has pickle weights only.
        InvalidInput: No safetensors weights or no config.json.
    """
    from huggingface_hub.errors import HfHubHTTPError

    revision = revision or "main"
    api = _api()
    try:
        info = api.model_info(repo_id, revision=revision)
        names = sorted(s.rfilename for s in (info.siblings or []))
        files: dict[str, int] = {}
        for entry in api.list_repo_tree(repo_id, revision=info.sha):
            if getattr(entry, "size", None) is not None and _allowed(entry.path):
                files[entry.path] = int(entry.size)
    except HfHubHTTPError as exc:
        raise _hub_error(repo_id, revision, exc) from exc
    shown = f"{repo_id}@{revision}"
    if not any(n.endswith(".safetensors") and "/" not in n for n in names):
        pickles = [n for n in names if is_pickle_name(n)]
        if pickles:
            raise UnsafeWeights(
                f"{shown} has only pickle weights ({', '.join(pickles[:3])}); pickle can run "
                "code on load, so nothing was downloaded",
                fix="Use a revision or a conversion of the model with .safetensors weights.")
        raise InvalidInput(f"{shown} has no .safetensors weights (files: "
                           f"{', '.join(names[:6]) or 'none'})",
                           fix="Pick a repo that holds the model's safetensors weights.",
                           param="source")
    if "config.json" not in names:
        raise InvalidInput(f"{shown} has no config.json, so it is not a transformers model repo",
                           fix="Pick a transformers model repo.", param="source")
    card = getattr(info, "card_data", None)
    gated = getattr(info, "gated", None)
    if gated and not os.environ.get("HF_TOKEN"):
        raise _gated_error(repo_id)
    return BasePlan(repo_id=repo_id, revision=revision, sha=info.sha, files=files,
                    skipped=[n for n in names if n not in files],
                    gated=str(gated) if gated else "",
                    license=str(getattr(card, "license", "") or "") if card else "")


def bases_dir(home: Path) -> Path:
    """Where downloaded bases live: ``$LORADOCK_HOME/bases``."""
    return Path(home) / "bases"


def _folder_name(base_plan: BasePlan) -> str:
    return f"{base_plan.repo_id.replace('/', '--')}--{base_plan.sha[:12]}"


def _check_space(base_plan: BasePlan, partial: Path, max_bytes: int | None) -> None:
    total = base_plan.total_bytes
    if max_bytes is not None and total > max_bytes:
        raise InvalidInput(
            f"{base_plan.repo_id}@{base_plan.sha[:12]} is {total / 1e9:.2f} GB, over the "
            f"{max_bytes / 1e9:.2f} GB cap",
            fix="Raise it with --max-gb N, or lift it with --no-size-cap.", param="max_gb")
    have = sum(p.stat().st_size for p in partial.glob("*") if p.is_file())
    free = shutil.disk_usage(partial).free
    if total - have > free:
        raise DiskFull(
            f"{base_plan.repo_id} needs {(total - have) / 1e9:.2f} GB more but "
            f"{partial.parent} has {free / 1e9:.2f} GB free",
            fix="Free disk space or point LORADOCK_HOME at a larger disk, then rerun.")


def download(
    base_plan: BasePlan,
    home: Path,
    *,
    max_bytes: int | None = int(DEFAULT_MAX_GB * 1e9),
    check_config: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> Path:
    """Fetch the planned files (resuming a partial download) and return the complete folder.

    ``config.json`` is fetched first and given to ``check_config``, so an architecture the
    caller rejects costs no weight download.

    Raises:
        InvalidInput: Over ``max_bytes``.
        DiskFull: Not enough free space, or the disk filled during the download.
        RemoteError / NotFound: The Hub failed.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    root = bases_dir(home)
    final = root / _folder_name(base_plan)
    if (final / "config.json").is_file():
        if check_config is not None:
            check_config(json.loads((final / "config.json").read_text()))
        return final
    partial = root / f"{PARTIAL_PREFIX}{final.name}"
    partial.mkdir(parents=True, exist_ok=True)
    _check_space(base_plan, partial, max_bytes)
    kwargs: dict[str, Any] = {
        "revision": base_plan.sha, "local_dir": partial,
        "endpoint": os.environ.get("HF_ENDPOINT") or None,
        "token": os.environ.get("HF_TOKEN") or None,
    }
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        config_path = hf_hub_download(base_plan.repo_id, "config.json", **kwargs)
        if check_config is not None:
            check_config(json.loads(Path(config_path).read_text()))
        snapshot_download(base_plan.repo_id, allow_patterns=sorted(base_plan.files), **kwargs)
    except HfHubHTTPError as exc:
        raise _hub_error(base_plan.repo_id, base_plan.sha, exc) from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(
                f"The disk filled while downloading {base_plan.repo_id} into {partial.parent}",
                fix="Free disk space and rerun the same command: the download resumes.") from exc
        raise
    _check_complete(base_plan, partial)
    shutil.rmtree(partial / ".cache", ignore_errors=True)
    partial.rename(final)
    return final


def _check_complete(base_plan: BasePlan, folder: Path) -> None:
    bad = [n for n, size in base_plan.files.items()
           if not (folder / n).is_file() or (folder / n).stat().st_size != size]
    if bad:
        raise RemoteError(f"The download of {base_plan.repo_id}@{base_plan.sha[:12]} is "
                          f"incomplete: {', '.join(bad[:4])}",
                          fix="Rerun the same command: the download resumes.")


def card_facts(folder: Path) -> dict[str, Any]:
    """Licence and pre-training tokens from the folder's card front matter or text."""
    facts: dict[str, Any] = {}
    readme = folder / "README.md"
    if not readme.is_file():
        return facts
    from huggingface_hub import ModelCard

    card = ModelCard.load(readme)
    license_ = card.data.get("license")
    if license_:
        facts["license"] = str(license_)
    found = _TOKENS.search(card.text or "")
    if found:
        unit = found.group(2).lower()[0]
        facts["training_tokens"] = int(float(found.group(1)) * (1e12 if unit == "t" else 1e9))
    return facts


def config_facts(folder: Path) -> dict[str, Any]:
    """Training tokens when ``config.json`` records them (few do)."""
    config = json.loads((folder / "config.json").read_text())
    for key in ("training_tokens", "num_training_tokens", "pretraining_tokens"):
        if isinstance(config.get(key), int | float) and config[key] > 0:
            return {"training_tokens": int(config[key])}
    return {}


def add_base_from_hub(
    store: Any,
    name: str,
    spec: str,
    *,
    max_bytes: int | None = int(DEFAULT_MAX_GB * 1e9),
    check_config: Callable[[dict[str, Any]], None] | None = None,
    on_plan: Callable[[BasePlan], None] | None = None,
    progress: bool = True,
) -> BaseInfo:
    """Plan, download and register ``spec`` (``ORG/NAME[@REV]``) as base ``name``.

    ``on_plan`` is called with the plan before any weight is fetched (the CLI prints the size).

    Raises:
        Every error of `plan` and `download`, plus `Store.add_base`'s.
    """
    validate_name(name, "base name")
    repo_id, revision = parse_spec(spec)
    base_plan = plan(repo_id, revision)
    if on_plan is not None:
        on_plan(base_plan)
    folder = download(base_plan, store.home, max_bytes=max_bytes, check_config=check_config,
                      progress=progress)
    extra: dict[str, Any] = {"license": base_plan.license}
    extra.update({k: v for k, v in card_facts(folder).items() if v and not extra.get(k)})
    for key, value in config_facts(folder).items():
        extra.setdefault(key, value)
    extra["revision"] = base_plan.sha
    extra["aliases"] = [f"{repo_id}@{base_plan.sha}", repo_id.split("/")[1]]
    return store.add_base(name, folder, hf_id=repo_id, **extra)
