"""One Ray cluster and one Serve app for the Ray tests (``make test-ray``).

``ray.init(num_cpus=2)``; 2 engine replicas at 0.5 CPU each (real SmolLM2, peft engine, fp32,
``OMP_NUM_THREADS=1``), 2 adapters per replica; adapters published on the stand-in Hub on
127.0.0.1, which the replicas pull from lazily. The cluster is started once per module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hub.store import Store
from tests.hub.standin_hub import StandInHub
from tests.serve.helpers import free_port

try:
    import ray.serve  # noqa: F401
except ImportError:  # the ray extra is optional: `make test-ray` installs it
    collect_ignore_glob = ["test_*.py"]

TOKEN = "hf_standin_ray_token_1234567890"
CARD = ("---\ndraft: false\nlicense: apache-2.0\n"
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n# bot\n")
WEIGHTS = "adapter_model.safetensors"
MAX_ONGOING = 2  # requests one engine replica takes before Ray routes to the other


@dataclass
class RayApp:
    """The running app: its URL, the stand-in Hub, and a publisher store that pushes to it."""

    url: str
    hub: StandInHub
    publisher: Store
    folders: Path
    adapter_factory: object
    handle: object

    def publish(self, name: str, seed: int, *, force_tag: bool = False,
                version: int | None = None) -> object:
        """Register a fresh random adapter as the next version of ``name`` and push it."""
        from hub import remote

        folder = self.folders / f"{name}-{seed}"
        if not folder.exists():
            shutil.copytree(self.adapter_factory(seed=seed), folder)
            (folder / "README.md").write_text(CARD)
        record = self.publisher.register(folder, name, version=version)
        remote.push(self.publisher, record, f"acme/{name}", force_tag=force_tag)
        return record

    def downloads(self, name: str) -> int:
        return self.hub.downloads(f"acme/{name}", WEIGHTS)


@pytest.fixture(scope="module")
def ray_app(adapter_factory, base_info, tmp_path_factory):
    import huggingface_hub.constants
    import ray
    from ray import serve

    from serve.ray.app import APP_NAME, RaySettings, build_app
    from serve.server import ServerConfig
    from tests.conftest import TEST_CACHE

    root = tmp_path_factory.mktemp("ray")
    saved = dict(os.environ)
    with StandInHub(TOKEN) as hub:
        # Set before ray.init: the workers Ray starts inherit this environment.
        os.environ.update({"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN,
                           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                           "LORADOCK_CACHE": str(TEST_CACHE / "bases"),
                           "OMP_NUM_THREADS": "1", "RAY_SERVE_LOG_TO_STDERR": "0"})
        huggingface_hub.constants.HF_HUB_OFFLINE = False
        huggingface_hub.constants.HF_HUB_DISABLE_XET = True
        publisher = Store(root / "publisher", cache=TEST_CACHE / "bases")
        app = RayApp("", hub, publisher, root / "folders", adapter_factory, None)
        app.folders.mkdir()
        for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3)):
            app.publish(name, seed)
        port = free_port()
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
                 logging_level="warning")
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            config = ServerConfig(engine="peft", base_dtype="fp32", threads=1, max_adapters=2,
                                  max_running=8, remote="hf:acme", home=root / "home", ui=False)
            layout = RaySettings(replicas=2, replica_cpus=0.5, ingress_cpus=0.5,
                                 max_ongoing_requests=MAX_ONGOING)
            started = time.monotonic()
            handle = serve.run(build_app(config, layout), name=APP_NAME, route_prefix="/")
            app.url = f"http://127.0.0.1:{port}"
            app.handle = serve.get_deployment_handle("engine", app_name=APP_NAME)
            wait_ready(app.url)
            print(f"ray app ready after {time.monotonic() - started:.1f} s")
            del handle
            yield app
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
            os.environ.clear()
            os.environ.update(saved)
            huggingface_hub.constants.HF_HUB_OFFLINE = True


def wait_ready(url: str, timeout_s: float = 300) -> None:
    """Wait until the ingress answers /health with 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"{url} not healthy after {timeout_s} s")
