"""Start a server from Python: build the store, engine and app, run uvicorn, drain on SIGTERM.

``run_server(engine="peft", port=8000)`` blocks until the process is told to stop; on SIGTERM
(or Ctrl-C) new requests get 503, uvicorn stops accepting connections and waits for open ones,
the engine drains its running requests (`Engine.shutdown`), and the call returns normally, so a
process whose main is ``run_server`` exits 0. ``BackgroundServer`` runs the same thing in a
thread for demo scripts and notebooks (``with BackgroundServer(ServerConfig(...)) as url:``).

Where the job ends: process plumbing and configuration checks. The HTTP surface is
`serve.http`; the CLI flags that fill `ServerConfig` are in `loradock/cli_serve.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.errors import InvalidInput
from hub.store import Store
from serve.engine import BaseDtype, EngineConfig, create_engine
from serve.http.state import DEFAULT_MAX_BODY_BYTES, AppState

log = logging.getLogger("loradock.serve")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerConfig:
    """Everything ``loradock serve`` takes; see ``loradock serve --help`` for each flag's help.

    Attributes mirror the CLI flags one to one (``api_keys`` is ``--api-keys``...);
    ``engine_options`` holds ``--engine-option KEY=VALUE`` pairs and ``home`` overrides
    ``LORADOCK_HOME``.
    """

    engine: str = "peft"
    base: str = "smollm2"
    host: str = "127.0.0.1"
    port: int = 8000
    base_dtype: BaseDtype = "auto"
    device: str = "auto"
    max_adapters: int = 8
    max_running: int = 16
    max_queue: int = 64
    max_model_len: int = 2048
    max_lora_rank: int = 64
    threads: int = 0
    api_keys: Path | None = None
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    engine_options: dict[str, Any] = field(default_factory=dict)
    home: Path | None = None
    remote: str | None = None
    log_level: str = "info"
    ui: bool = True

    def check(self) -> None:
        """Collect every problem and raise them together.

        Raises:
            InvalidInput: Naming each bad flag and value.
        """
        problems = []
        if self.api_keys is None and self.host not in LOCAL_HOSTS:
            problems.append(
                f"--host {self.host} without --api-keys: an open server may only bind "
                f"{', '.join(LOCAL_HOSTS)}; pass --api-keys FILE to listen on other addresses"
            )
        if self.api_keys is not None and not Path(self.api_keys).is_file():
            problems.append(f"--api-keys {self.api_keys} is not a file")
        if not 0 <= self.port <= 65535:
            problems.append(f"--port {self.port} is not in 0-65535")
        for flag, value, low in (
            ("--max-adapters", self.max_adapters, 1), ("--max-running", self.max_running, 1),
            ("--max-queue", self.max_queue, 0), ("--max-model-len", self.max_model_len, 16),
            ("--threads", self.threads, 0),
        ):
            if value < low:
                problems.append(f"{flag} {value} must be at least {low}")
        for flag, value in (("--request-timeout-s", self.request_timeout_s),
                            ("--drain-timeout-s", self.drain_timeout_s)):
            if not value > 0:
                problems.append(f"{flag} {value} must be positive")
        if self.max_body_bytes < 1024:
            problems.append(f"max_body_bytes {self.max_body_bytes} must be at least 1024")
        if problems:
            raise InvalidInput("; ".join(problems),
                               param="host" if problems[0].startswith("--host") else None)


def build_state(config: ServerConfig) -> AppState:
    """Open the store, resolve the base (converting the embedded one once), create the engine.

    The engine is created but not started: the app's lifespan starts it.
    """
    from serve.http.auth import ApiKeys

    config.check()
    keys = ApiKeys.load(config.api_keys) if config.api_keys else None
    store = Store(config.home, remote=config.remote)  # --remote: lazy, pinned, verified pulls
    base = store.base(config.base)
    max_model_len = min(config.max_model_len, base.context_length or config.max_model_len)
    engine_config = EngineConfig(
        base=base,
        base_dtype=config.base_dtype,
        device=config.device,
        max_adapters=config.max_adapters,
        max_running=config.max_running,
        max_queue=config.max_queue,
        max_model_len=max_model_len,
        max_lora_rank=config.max_lora_rank,
        threads=config.threads,
        options=dict(config.engine_options),
    )
    engine = create_engine(config.engine, engine_config)
    return AppState(
        store=store,
        base=base,
        engine=engine,
        keys=keys,
        max_model_len=max_model_len,
        request_timeout_s=config.request_timeout_s,
        max_body_bytes=config.max_body_bytes,
        drain_timeout_s=config.drain_timeout_s,
    )


def _uvicorn_server(config: ServerConfig, state: AppState) -> Any:
    import uvicorn

    from serve.http.app import create_app

    class _Server(uvicorn.Server):
        """Marks the app draining on the first signal; SIGTERM ends with exit status 0."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not state.draining:
                log.info("signal %s: draining", signal.Signals(sig).name)
            state.draining = True
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and signal.SIGTERM in self._captured_signals:
                self._captured_signals.remove(signal.SIGTERM)

    uv_config = uvicorn.Config(
        create_app(state, ui=config.ui),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=config.drain_timeout_s,
        server_header=False,
    )
    return _Server(uv_config)


def configure_logging(level: str = "info") -> None:
    """One readable line per event on stderr (never request bodies or keys)."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_server(config: ServerConfig | None = None, **overrides: Any) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return.

    Args:
        config: Full configuration; fields in ``overrides`` replace its values.
        **overrides: Any `ServerConfig` field, e.g. ``run_server(engine="fake", port=0)``.

    Raises:
        InvalidInput: Bad configuration (all problems at once).
        NotFound: Unknown base.
    """
    config = dataclasses.replace(config or ServerConfig(), **overrides)
    configure_logging(config.log_level)
    state = build_state(config)
    server = _uvicorn_server(config, state)
    server.run()


class BackgroundServer:
    """Run a server in a daemon thread (for demo scripts); use as a context manager.

    Example:
        >>> with BackgroundServer(ServerConfig(engine="peft", port=8011)) as url:
        ...     client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    """

    def __init__(self, config: ServerConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or ServerConfig(), **overrides)
        self.state = build_state(self.config)
        self._server = _uvicorn_server(self.config, self.state)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="loradock")

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (the bound port when 0 was asked)."""
        port = self.config.port
        servers = getattr(self._server, "servers", None) or []
        for srv in servers:
            for sock in srv.sockets:
                port = sock.getsockname()[1]
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"http://{host}:{port}"

    def start(self, timeout_s: float = 600.0) -> str:
        """Start and wait until the engine is ready; return the URL."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise InvalidInput("The server stopped during startup; see the log above.")
            if time.monotonic() > deadline:
                raise InvalidInput(f"The server did not start within {timeout_s:g} s.")
            time.sleep(0.05)
        return self.url

    def stop(self) -> None:
        """Drain and stop (blocks until the engine has shut down)."""
        self.state.draining = True
        self._server.should_exit = True
        self._thread.join()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
