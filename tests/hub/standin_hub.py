"""A STAND-IN for the Hugging Face Hub, on 127.0.0.1, for tests only.

The real Hub is unreachable from this machine. This server speaks just the part of the Hub HTTP
API that huggingface_hub uses for ``create_repo``, ``upload_folder`` (preupload + NDJSON commit,
every file sent as a regular base64 blob), ``create_tag``, ``repo_info`` and
``snapshot_download`` (``resolve`` with the ``X-Repo-Commit``/``ETag`` headers). It keeps repos
in memory and records every request so tests can assert on the files and revisions it received.
It checks the bearer token like the Hub does and never prints it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


def _git_oid(data: bytes) -> str:
    """The git blob id the Hub reports for a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def files_at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision in ("main", "HEAD") and self.commits:
            return self.commits[-1]
        sha = self.tags.get(revision, revision)
        for commit_sha, files in self.commits:
            if commit_sha == sha:
                return commit_sha, files
        return None


class StandInHub:
    """In-memory Hub; ``with StandInHub(token) as hub: hub.endpoint``."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.auth_failures = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StandInHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

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

            def _json(self, status: int, data: object) -> None:
                self._send(status, json.dumps(data).encode())

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {hub.token}":
                    return True
                hub.auth_failures += 1
                self._json(401, {"error": "Invalid credentials in Authorization header"})
                return False

            def do_HEAD(self) -> None:  # noqa: N802
                self.do_GET()

            def do_GET(self) -> None:  # noqa: N802
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                if not self._authorised():
                    return
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                    return self._tree("/".join(parts[2:4]), parts[5])
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id = "/".join(parts[2:4])
                    revision = parts[5] if len(parts) > 5 and parts[4] == "revision" else "main"
                    return self._repo_info(repo_id, revision)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                    return self._resolve(repo_id, revision, filename)
                self._json(404, {"error": f"stand-in hub: no route for {path}"})

            def _repo_info(self, repo_id: str, revision: str) -> None:
                repo = hub.repos.get(repo_id)
                found = repo.files_at(revision) if repo else None
                if found is None:
                    return self._send(404, b'{"error":"Repository not found"}',
                                      {"X-Error-Code": "RepoNotFound"})
                sha, files = found
                self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha,
                                 "private": repo.private,
                                 "siblings": [{"rfilename": name} for name in sorted(files)]})

            def _tree(self, repo_id: str, revision: str) -> None:
                repo = hub.repos.get(repo_id)
                found = repo.files_at(revision) if repo else None
                if found is None:
                    return self._json(404, {"error": "Revision not found"})
                self._json(200, [{"type": "file", "path": name, "size": len(data),
                                  "oid": _git_oid(data)}
                                 for name, data in sorted(found[1].items())])

            def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
                repo = hub.repos.get(repo_id)
                found = repo.files_at(revision) if repo else None
                if found is None or filename not in found[1]:
                    return self._send(404, b'{"error":"Entry not found"}',
                                      {"X-Error-Code": "EntryNotFound"})
                sha, files = found
                data = files[filename]
                self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{_git_oid(data)}"'},
                           content_type="application/octet-stream")

            def do_POST(self) -> None:  # noqa: N802
                path = unquote(urlparse(self.path).path)
                hub.requests.append(("POST", path))
                body = self._body()
                if not self._authorised():
                    return
                parts = path.strip("/").split("/")
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    if repo_id in hub.repos:
                        return self._json(409, {"error": "You already created this model repo",
                                                "url": f"{hub.endpoint}/{repo_id}"})
                    private = payload.get("visibility") == "private" or bool(payload.get("private"))
                    hub.repos[repo_id] = Repo(private=private)
                    return self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    return self._json(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    repo_id, action = "/".join(parts[2:4]), parts[4]
                    if repo_id not in hub.repos:
                        return self._send(404, b'{"error":"Repository not found"}',
                                          {"X-Error-Code": "RepoNotFound"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._json(200, {"files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                             "oid": None} for f in files]})
                    if action == "commit":
                        return self._commit(repo_id, body)
                    if action == "tag":
                        return self._tag(repo_id, parts[5], json.loads(body))
                self._json(404, {"error": f"stand-in hub: no route for {path}"})

            def _commit(self, repo_id: str, body: bytes) -> None:
                repo = hub.repos[repo_id]
                files = dict(repo.commits[-1][1]) if repo.commits else {}
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        value = item["value"]
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(item["value"]["path"], None)
                digest = hashlib.sha1()
                for name in sorted(files):
                    digest.update(name.encode() + b"\0" + files[name])
                digest.update(str(len(repo.commits)).encode())
                sha = digest.hexdigest()
                repo.commits.append((sha, files))
                self._json(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}",
                                 "commitOid": sha, "pullRequestUrl": None})

            def _tag(self, repo_id: str, revision: str, payload: dict) -> None:
                repo = hub.repos[repo_id]
                found = repo.files_at(revision)
                if found is None:
                    return self._json(404, {"error": "Revision not found"})
                if payload["tag"] in repo.tags:
                    return self._json(409, {"error": "Tag already exists"})
                repo.tags[payload["tag"]] = found[0]
                self._json(200, {})

        return Handler
