"""A STAND-IN for the Hugging Face Hub's dataset endpoints, on 127.0.0.1, for tests only.

It answers the two calls `train.data.hub_source` makes through huggingface_hub:
``GET /api/datasets/ORG/NAME[/revision/REV]`` (repo info: commit sha and file list) and
``HEAD``/``GET /datasets/ORG/NAME/resolve/REV/FILE`` (the file, with the ``X-Repo-Commit`` and
``ETag`` headers huggingface_hub's cache needs). Repos are in memory: ``add(repo, files, tag)``
makes a commit. Every request path is recorded. (tests/hub/standin_hub.py is the model-repo
stand-in; this one is separate so each stays small.)
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class StandInDatasets:
    """In-memory dataset repos; ``with StandInDatasets() as hub: hub.endpoint``."""

    def __init__(self) -> None:
        self.commits: dict[str, list[tuple[str, dict[str, bytes]]]] = {}
        self.tags: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str]] = []
        self.salt = uuid.uuid4().hex  # commit shas differ between stand-ins (caches never hit)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StandInDatasets:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, repo: str, files: dict[str, bytes], tag: str | None = None) -> str:
        """Commit ``files`` (the whole tree) to ``repo``; return the commit sha."""
        history = self.commits.setdefault(repo, [])
        sha = hashlib.sha1(f"{self.salt}:{repo}:{len(history)}".encode()).hexdigest()
        history.append((sha, dict(files)))
        if tag:
            self.tags[(repo, tag)] = sha
        return sha

    def _at(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        history = self.commits.get(repo) or []
        if revision == "main" and history:
            return history[-1]
        sha = self.tags.get((repo, revision), revision)
        return next(((s, f) for s, f in history if s == sha), None)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _missing(self, code: str) -> None:
                self._send(404, json.dumps({"error": code}).encode(),
                           {"X-Error-Code": code, "Content-Type": "application/json"})

            def do_HEAD(self) -> None:  # noqa: N802
                self.do_GET()

            def do_GET(self) -> None:  # noqa: N802
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
                    repo = "/".join(parts[2:4])
                    revision = parts[5] if len(parts) > 5 and parts[4] == "revision" else "main"
                    found = hub._at(repo, revision)
                    if found is None:
                        code = "RevisionNotFound" if repo in hub.commits else "RepoNotFound"
                        return self._missing(code)
                    body = {"id": repo, "sha": found[0], "private": False,
                            "siblings": [{"rfilename": name} for name in sorted(found[1])]}
                    return self._send(200, json.dumps(body).encode(),
                                      {"Content-Type": "application/json"})
                if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
                    repo, revision, name = "/".join(parts[1:3]), parts[4], "/".join(parts[5:])
                    found = hub._at(repo, revision)
                    if found is None or name not in found[1]:
                        return self._missing("EntryNotFound")
                    data = found[1][name]
                    etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                    return self._send(200, data, {"X-Repo-Commit": found[0], "ETag": f'"{etag}"',
                                                  "Content-Type": "application/octet-stream"})
                self._missing("NoRoute")

        return Handler
