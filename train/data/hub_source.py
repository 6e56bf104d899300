"""Datasets from the Hugging Face Hub: ``hf://datasets/ORG/NAME[@REV][/FILE]`` -> a local file.

The recipe's ``data`` (and ``loradock data`` commands through `resolve_source`) may name a Hub
dataset instead of a local file:

- ``hf://datasets/ORG/NAME``: the newest commit of the default branch;
- ``hf://datasets/ORG/NAME@REV``: a branch, tag or commit sha (no ``/`` in ``REV``);
- ``.../FILE``: one file of the repo; without it the repo must hold exactly one data file
  (JSONL, JSON, CSV, TSV or Parquet), or exactly one whose path contains ``train``.

The revision is resolved once to its commit sha (``HfApi.dataset_info``), and the file is
downloaded at that sha (``hf_hub_download``, huggingface_hub's cache), so a run records exactly
which bytes it trained on: `fetch_hub_dataset` returns the origin (repo, revision asked, commit
sha, file) that `train.data.prepare_dataset` writes into the report and the manifest. The
endpoint and token are huggingface_hub's (``HF_ENDPOINT``, ``HF_TOKEN``); with
``HF_HUB_OFFLINE=1`` only the local cache is used.

Where the job ends: this module fetches one file; reading and checking it is the pipeline's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from hub.errors import InvalidInput, NotFound
from train.data.loaders import SUFFIXES

PREFIX = "hf://datasets/"
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_SPEC = re.compile(
    rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[A-Za-z0-9._-]{{1,128}}))?(?:/(?P<file>.+))?$"
)


def is_hub_dataset(data: str) -> bool:
    """True when ``data`` names a Hub dataset (``hf://datasets/...``)."""
    return str(data).startswith(PREFIX)


def parse_hub_dataset(data: str) -> tuple[str, str | None, str | None]:
    """Split ``hf://datasets/ORG/NAME[@REV][/FILE]`` into ``(repo_id, revision, file)``.

    Raises:
        InvalidInput: Not of that form, or a file path with ``..`` or an unknown suffix.
    """
    match = _SPEC.match(str(data)[len(PREFIX):]) if is_hub_dataset(data) else None
    file = match.group("file") if match else None
    bad_file = file is not None and (
        ".." in file.split("/") or Path(file).suffix.lower() not in SUFFIXES
    )
    if match is None or bad_file:
        raise InvalidInput(
            f"data {data!r} is not a Hub dataset reference",
            fix="Write hf://datasets/ORG/NAME, hf://datasets/ORG/NAME@REVISION or "
            "hf://datasets/ORG/NAME@REVISION/path/file.jsonl (JSONL, JSON, CSV, TSV or Parquet).",
            param="data",
        )
    return match.group("repo"), match.group("rev"), file


def _pick_file(files: list[str], data: str) -> str:
    candidates = [f for f in files if Path(f).suffix.lower() in SUFFIXES]
    if len(candidates) > 1:
        train = [f for f in candidates if "train" in f.lower()]
        candidates = train if len(train) == 1 else candidates
    if len(candidates) != 1:
        shown = ", ".join(candidates[:10]) or "none"
        raise InvalidInput(
            f"{data} holds {len(candidates)} data files ({shown}); loradock reads one",
            fix=f"Name the file after the repo, e.g. "
            f"{data}/{candidates[0] if candidates else 'train.jsonl'}.",
            param="data",
        )
    return candidates[0]


def fetch_hub_dataset(data: str, *, cache_dir: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Download the data file ``data`` names (see the module docstring) at a pinned commit.

    Args:
        data: ``hf://datasets/ORG/NAME[@REV][/FILE]``.
        cache_dir: huggingface_hub cache folder (default: its own, ``HF_HUB_CACHE``).

    Returns:
        ``(local file, origin)``; origin is ``{"source", "repo", "revision", "sha", "file"}``.

    Raises:
        InvalidInput: A malformed reference or an ambiguous repo.
        NotFound: The repo, revision or file does not exist (or is not in the offline cache).
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision, file = parse_hub_dataset(data)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = os.environ.get("HF_TOKEN") or None
    try:
        info = HfApi(endpoint=endpoint, token=token).dataset_info(repo_id, revision=revision)
        sha = str(info.sha)
        names = [s.rfilename for s in info.siblings or []]
        file = file or _pick_file(names, data)
        local = hf_hub_download(
            repo_id, file, repo_type="dataset", revision=sha, endpoint=endpoint, token=token,
            cache_dir=str(cache_dir) if cache_dir else None,
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise NotFound(
            f"Hub dataset {data} is not in the local cache and the Hub is not reachable "
            "(HF_HUB_OFFLINE is set, or there is no network)",
            fix="Download it once with HF_HUB_OFFLINE=0 (the CLI sets 1 by default), or give a "
            "local file.",
            param="data",
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise NotFound(
            f"Hub dataset {data}: {type(exc).__name__.removesuffix('Error')} "
            f"(repo {repo_id}, revision {revision or 'main'}, file {file or 'auto'})",
            fix="Check the repo id, revision and file name; private datasets need HF_TOKEN.",
            param="data",
        ) from exc
    except HfHubHTTPError as exc:
        raise NotFound(
            f"Hub dataset {data}: the Hub answered HTTP "
            f"{getattr(exc.response, 'status_code', '?')}",
            fix="Check HF_ENDPOINT and HF_TOKEN, or give a local file.", param="data",
        ) from exc
    origin = {
        "source": data, "repo": repo_id, "revision": revision or "main", "sha": sha,
        "file": file,
    }
    return Path(local), origin


def resolve_source(data: str, *, cache_dir: Path | None = None) -> tuple[Path, dict | None]:
    """A local path for ``data``: itself, or the fetched file of a Hub dataset (with origin)."""
    if is_hub_dataset(data):
        return fetch_hub_dataset(data, cache_dir=cache_dir)
    return Path(data), None
