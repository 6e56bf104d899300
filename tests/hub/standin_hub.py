"""A STAND-IN for the Hugging Face Hub, on 127.0.0.1, for tests only.

The real Hub is unreachable from this machine. This server speaks the part of the Hub HTTP API
that huggingface_hub (with ``HF_HUB_DISABLE_XET=1``) uses, the way the Hub answers it:

- ``create_repo`` (409 when it exists), ``repo_info`` / ``model_info`` at a revision (branch, tag
  or commit), ``list_repo_refs``, ``list_repo_tree``, ``whoami``;
- ``upload_folder`` / ``create_commit``: ``preupload`` says ``lfs`` for ``*.safetensors`` and
  files over 10 MB (the Hub's default ``.gitattributes``) and ``regular`` otherwise; LFS content
  goes through the LFS batch API (``REPO.git/info/lfs/objects/batch``), a ``PUT`` of the bytes
  (refused unless they hash to the announced sha256) and the ``verify`` call; the NDJSON commit
  then names LFS files by ``lfsFile`` oid (refused if that object was never uploaded) and
  regular files by base64 content, and ``deletedFile`` entries remove files;
- ``create_tag`` (409 when the tag exists) and ``delete_tag``;
- downloads through ``resolve``: regular files directly, LFS files by a 302 to a CDN on another
  origin (a second port) with ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``, as the Hub does.

Every commit is kept (``Repo.commits``, oldest first) and tags point at commits. Each request
is recorded so that tests can count downloads. `StandInHub.tamper` changes a stored file's bytes
behind the Hub's back (a compromised mirror or storage). The bearer token is checked like the
Hub does and never printed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def _git_oid(data: bytes) -> str:
    """The git blob id the Hub reports for a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    """Whether the Hub stores ``path`` in LFS (default ``.gitattributes``: ``*.safetensors``)."""
    return path.endswith(".safetensors") or size > LFS_THRESHOLD


@dataclass
class Repo:
    """One model repo: its commits (oldest first) and tags (name -> commit sha)."""

    private: bool
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    pointers: dict[tuple[str, str], str] = field(default_factory=dict)  # (commit, path) -> oid

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision in ("main", "HEAD", "refs/heads/main") and self.commits:
            return self.commits[-1]
        sha = self.tags.get(revision.removeprefix("refs/tags/"), revision)
        for commit_sha, files in self.commits:
            if commit_sha == sha:
                return commit_sha, files
        return None


class StandInHub:
    """In-memory Hub; ``with StandInHub(token) as hub: hub.endpoint``."""

    def __init__(self, token: str, user: str = "acme") -> None:
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.auth_failures = 0
        self.lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())  # another origin
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.cdn_endpoint = f"http://127.0.0.1:{self._cdn.server_address[1]}"
        self._threads = [threading.Thread(target=server.serve_forever, daemon=True)
                         for server in (self._server, self._cdn)]
        for server in (self._server, self._cdn):
            server.daemon_threads = True

    def __enter__(self) -> StandInHub:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self._server, self._cdn):
            server.shutdown()
            server.server_close()

    def downloads(self, repo_id: str, filename: str) -> int:
        """How many times the bytes of ``filename`` of ``repo_id`` were sent (GET, not HEAD)."""
        with self.lock:
            repo = self.repos.get(repo_id)
            oids = {oid for (_, path), oid in repo.pointers.items()
                    if path == filename} if repo else set()
            return sum(1 for method, path in self.requests if method == "GET" and (
                (path.startswith(f"/{repo_id}/resolve/") and path.endswith(f"/{filename}"))
                or path.removeprefix("/cdn/") in oids))

    def tamper(self, repo_id: str, revision: str, filename: str, data: bytes) -> None:
        """Replace a stored file's bytes without a commit (what a compromised storage serves)."""
        with self.lock:
            repo = self.repos[repo_id]
            found = repo.files_at(revision)
            assert found is not None, revision
            found[1][filename] = data
            oid = repo.pointers.get((found[0], filename))
            if oid is not None:
                self.lfs_objects[oid] = data

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                return

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
                      content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status: int, data: object, headers: dict | None = None) -> None:
                self._send(status, json.dumps(data).encode(), headers)

            def _error(self, status: int, message: str, code: str | None = None) -> None:
                self._json(status, {"error": message}, {"X-Error-Code": code} if code else None)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {hub.token}":
                    return True
                hub.auth_failures += 1
                self._json(401, {"error": "Invalid credentials in Authorization header"})
                return False

            def _record(self) -> tuple[str, list[str]]:
                path = unquote(urlparse(self.path).path)
                with hub.lock:
                    hub.requests.append((self.command, path))
                return path, path.strip("/").split("/")

            def _repo(self, repo_id: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "Repository not found", "RepoNotFound")
                return repo

            # -- reads ------------------------------------------------------------------

            def do_HEAD(self) -> None:  # noqa: N802
                self.do_GET()

            def do_GET(self) -> None:  # noqa: N802
                path, parts = self._record()
                if parts[:1] == ["cdn"] and len(parts) == 2:  # the LFS CDN is not authenticated
                    return self._cdn(parts[1])
                if not self._authorised():
                    return
                with hub.lock:
                    if parts[:2] == ["api", "whoami-v2"]:
                        return self._json(200, {"type": "user", "name": hub.user, "orgs": []})
                    if parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] == "tree":
                        revision = unquote(parts[5]) if len(parts) > 5 else "main"
                        return self._tree("/".join(parts[2:4]), revision)
                    if parts[:2] == ["api", "models"] and len(parts) == 5 and parts[4] == "refs":
                        return self._refs("/".join(parts[2:4]))
                    if parts[:2] == ["api", "models"] and len(parts) >= 4:
                        repo_id = "/".join(parts[2:4])
                        revision = ("/".join(parts[5:]) if len(parts) > 5
                                    and parts[4] == "revision" else "main")
                        return self._repo_info(repo_id, revision)
                    if len(parts) >= 5 and parts[2] == "resolve":
                        repo_id, revision = "/".join(parts[:2]), parts[3]
                        return self._resolve(repo_id, revision, "/".join(parts[4:]))
                self._error(404, f"stand-in hub: no route for {path}")

            def _repo_info(self, repo_id: str, revision: str) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                found = repo.files_at(revision)
                if found is None:
                    return self._error(404, "Invalid rev id", "RevisionNotFound")
                sha, files = found
                self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha,
                                 "private": repo.private,
                                 "siblings": [{"rfilename": name} for name in sorted(files)]})

            def _refs(self, repo_id: str) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                branches = ([{"name": "main", "ref": "refs/heads/main",
                              "targetCommit": repo.commits[-1][0]}] if repo.commits else [])
                tags = [{"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": sha}
                        for tag, sha in sorted(repo.tags.items())]
                self._json(200, {"branches": branches, "tags": tags, "converts": []})

            def _tree(self, repo_id: str, revision: str) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                found = repo.files_at(revision)
                if found is None:
                    return self._error(404, "Invalid rev id", "RevisionNotFound")
                entries = []
                for name, data in sorted(found[1].items()):
                    entry = {"type": "file", "path": name, "size": len(data),
                             "oid": _git_oid(data)}
                    if is_lfs(name, len(data)):
                        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(),
                                        "size": len(data), "pointerSize": 134}
                    entries.append(entry)
                self._json(200, entries)

            def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                found = repo.files_at(unquote(revision))
                if found is None or filename not in found[1]:
                    return self._error(404, "Entry not found", "EntryNotFound")
                sha, files = found
                data = files[filename]
                if is_lfs(filename, len(data)):
                    # The Hub redirects LFS files to its CDN; the pointer names the sha256 the
                    # commit recorded, whatever the storage now holds.
                    oid = self._recorded_oid(repo, sha, filename)
                    return self._send(302, b"", {
                        "Location": f"{hub.cdn_endpoint}/cdn/{oid}", "X-Repo-Commit": sha,
                        "X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(len(data)),
                        "ETag": f'"{_git_oid(data)}"'})
                self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{_git_oid(data)}"'},
                           content_type="application/octet-stream")

            def _recorded_oid(self, repo: Repo, sha: str, filename: str) -> str:
                return repo.pointers[(sha, filename)]

            def _cdn(self, oid: str) -> None:
                with hub.lock:
                    data = hub.lfs_objects.get(oid)
                if data is None:
                    return self._error(404, "Object not found")
                self._send(200, data, {"ETag": f'"{oid}"'}, content_type="application/octet-stream")

            # -- writes -----------------------------------------------------------------

            def do_PUT(self) -> None:  # noqa: N802
                path, parts = self._record()
                body = self._body()
                if parts[:1] == ["lfs-upload"] and len(parts) == 2:  # pre-signed: no auth
                    oid = parts[1]
                    if hashlib.sha256(body).hexdigest() != oid:
                        return self._error(422, "Uploaded bytes do not match the announced oid")
                    with hub.lock:
                        hub.lfs_objects[oid] = body
                    return self._send(200)
                self._error(404, f"stand-in hub: no route for {path}")

            def do_DELETE(self) -> None:  # noqa: N802
                path, parts = self._record()
                if not self._authorised():
                    return
                with hub.lock:
                    if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "tag":
                        repo = self._repo("/".join(parts[2:4]))
                        if repo is None:
                            return
                        if repo.tags.pop(unquote(parts[5]), None) is None:
                            return self._error(404, "Tag not found", "RevisionNotFound")
                        return self._json(200, {})
                self._error(404, f"stand-in hub: no route for {path}")

            def do_POST(self) -> None:  # noqa: N802
                path, parts = self._record()
                body = self._body()
                if parts[:1] == ["lfs-verify"]:
                    payload = json.loads(body)
                    with hub.lock:
                        ok = payload["oid"] in hub.lfs_objects
                    return self._json(200 if ok else 404, {})
                if not self._authorised():
                    return
                with hub.lock:
                    if path == "/api/repos/create":
                        return self._create(json.loads(body))
                    if path == "/api/validate-yaml":
                        return self._json(200, {"errors": [], "warnings": []})
                    if path.endswith(".git/info/lfs/objects/batch"):
                        return self._lfs_batch(json.loads(body))
                    if parts[:2] == ["api", "models"] and len(parts) >= 6:
                        repo_id, action = "/".join(parts[2:4]), parts[4]
                        repo = self._repo(repo_id)
                        if repo is None:
                            return
                        if action == "preupload":
                            return self._preupload(json.loads(body))
                        if action == "commit":
                            return self._commit(repo_id, repo, body)
                        if action == "tag":
                            return self._tag(repo, unquote("/".join(parts[5:])),
                                             json.loads(body))
                self._error(404, f"stand-in hub: no route for {path}")

            def _create(self, payload: dict) -> None:
                repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
                if repo_id in hub.repos:
                    return self._json(409, {"error": "You already created this model repo",
                                            "url": f"{hub.endpoint}/{repo_id}"})
                private = payload.get("visibility") == "private" or bool(payload.get("private"))
                repo = hub.repos[repo_id] = Repo(private=private)
                files = {".gitattributes": GITATTRIBUTES}  # the Hub's initial commit
                sha = hashlib.sha1(repo_id.encode() + GITATTRIBUTES).hexdigest()
                repo.commits.append((sha, files))
                self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

            def _preupload(self, payload: dict) -> None:
                self._json(200, {"files": [
                    {"path": f["path"], "shouldIgnore": False, "oid": None,
                     "uploadMode": "lfs" if is_lfs(f["path"], int(f.get("size", 0)))
                     else "regular"}
                    for f in payload["files"]]})

            def _lfs_batch(self, payload: dict) -> None:
                objects = []
                for obj in payload["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"]}
                    if obj["oid"] not in hub.lfs_objects:
                        entry["actions"] = {
                            "upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}"},
                            "verify": {"href": f"{hub.endpoint}/lfs-verify/{obj['oid']}"},
                        }
                    objects.append(entry)
                self._json(200, {"transfer": "basic", "objects": objects})

            def _commit(self, repo_id: str, repo: Repo, body: bytes) -> None:
                files = dict(repo.commits[-1][1]) if repo.commits else {}
                parent = repo.commits[-1][0] if repo.commits else None
                oids = {path: oid for (sha, path), oid in repo.pointers.items() if sha == parent}
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                        oids.pop(value["path"], None)
                    elif item["key"] == "lfsFile":
                        data = hub.lfs_objects.get(value["oid"])
                        if data is None:
                            return self._error(422, f"LFS object {value['oid']} was never "
                                                    f"uploaded for {value['path']}")
                        files[value["path"]] = data
                        oids[value["path"]] = value["oid"]
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                    elif item["key"] == "deletedFolder":
                        prefix = value["path"].rstrip("/") + "/"
                        files = {k: v for k, v in files.items() if not k.startswith(prefix)}
                digest = hashlib.sha1()
                for name in sorted(files):
                    digest.update(name.encode() + b"\0" + files[name])
                digest.update(str(len(repo.commits)).encode())
                sha = digest.hexdigest()
                repo.commits.append((sha, files))
                repo.pointers.update({(sha, path): oid for path, oid in oids.items()
                                      if path in files})
                self._json(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}",
                                 "commitOid": sha, "pullRequestUrl": None})

            def _tag(self, repo: Repo, revision: str, payload: dict) -> None:
                found = repo.files_at(revision)
                if found is None:
                    return self._error(404, "Invalid rev id", "RevisionNotFound")
                if payload["tag"] in repo.tags:
                    return self._json(409, {"error": f"Tag {payload['tag']} already exists"})
                repo.tags[payload["tag"]] = found[0]
                self._json(200, {})

        return Handler

