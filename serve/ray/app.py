"""Build the Ray Serve application, its ``serve run`` YAML, and run it for ``loradock serve --ray``.

``build_app(ServerConfig(...), RaySettings(replicas=2))`` returns the bound application: the
ingress deployment (`serve.ray.ingress.Ingress`) in front of the engine deployment
(`serve.ray.replica.EngineReplica`). ``write_config`` writes the same application as a
``serve run`` config file (``import_path: serve.ray.app:app_builder`` with the settings as
``args``), for clusters that deploy by YAML (KubeRay's ``RayService``: `docs/deploy.md`).

Scaling: a fixed ``replicas`` count, or with ``max_replicas`` above it Ray's
``autoscaling_config`` on ongoing requests per replica (``target_ongoing_requests``). Each engine
replica reserves ``replica_cpus`` and runs torch with ``OMP_NUM_THREADS`` = ``--threads`` (1
when 0).

Where the job ends: configuration and process plumbing; what the deployments do is in their
modules.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub.errors import InvalidInput
from serve.server import ServerConfig

log = logging.getLogger("loradock.serve.ray")
APP_NAME = "loradock"


@dataclass
class RaySettings:
    """How the application is laid out on Ray (the ``ray`` part of the settings).

    Attributes:
        replicas: Engine replicas at start (the minimum when autoscaling).
        max_replicas: Autoscale up to this many on ongoing requests (0: fixed ``replicas``).
        target_ongoing_requests: The autoscaler's target of requests per replica.
        replica_cpus: CPUs each engine replica reserves (``ray_actor_options.num_cpus``).
        ingress_cpus: CPUs the ingress replica reserves.
        max_ongoing_requests: Requests Ray sends one engine replica at once before it routes
            to another (0: the engine's ``--max-running``).
        ingress_replicas: Ingress replicas (stateless; each node's proxy routes to them).
    """

    replicas: int = 1
    max_replicas: int = 0
    target_ongoing_requests: float = 8.0
    replica_cpus: float = 1.0
    ingress_cpus: float = 0.5
    max_ongoing_requests: int = 0
    ingress_replicas: int = 1

    def check(self) -> None:
        """Raise every problem at once.

        Raises:
            InvalidInput: Naming each bad flag and value.
        """
        problems = []
        if self.replicas < 1:
            problems.append(f"--replicas {self.replicas} must be at least 1")
        if self.max_replicas and self.max_replicas < self.replicas:
            problems.append(f"--max-replicas {self.max_replicas} is below --replicas "
                            f"{self.replicas}")
        if not self.replica_cpus > 0:
            problems.append(f"--replica-cpus {self.replica_cpus} must be positive")
        if self.target_ongoing_requests <= 0:
            problems.append(f"target_ongoing_requests {self.target_ongoing_requests} must be "
                            "positive")
        if problems:
            raise InvalidInput("; ".join(problems), param="replicas")


def require_ray() -> None:
    """Raise a clear error when the ``ray`` extra is not installed.

    Raises:
        InvalidInput: No ``ray[serve]`` in this environment.
    """
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise InvalidInput("--ray needs Ray Serve, which is not installed",
                           fix="pip install 'loradock[ray]'", param="ray") from None


def settings_dict(config: ServerConfig, ray_settings: RaySettings) -> dict[str, Any]:
    """Plain data (YAML/JSON-safe) both deployments are built from."""
    server = dataclasses.asdict(config)
    for key in ("api_keys", "home"):
        if server[key] is not None:
            server[key] = str(server[key])
    server["cache"] = os.environ.get("LORADOCK_CACHE") or None
    return {"server": server, "ray": dataclasses.asdict(ray_settings)}


def app_builder(args: dict[str, Any]) -> Any:
    """The ``serve run`` entry point: ``import_path: serve.ray.app:app_builder``."""
    require_ray()
    from ray import serve

    from serve.ray.ingress import Ingress
    from serve.ray.replica import EngineReplica

    server, layout = args["server"], RaySettings(**args.get("ray", {}))
    layout.check()
    threads = int(server.get("threads") or 0) or 1
    env = {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false"}
    if server.get("cache"):
        env["LORADOCK_CACHE"] = str(server["cache"])
    scaling: dict[str, Any] = {"num_replicas": layout.replicas}
    if layout.max_replicas > layout.replicas:
        scaling = {"autoscaling_config": {
            "min_replicas": layout.replicas, "max_replicas": layout.max_replicas,
            "target_ongoing_requests": layout.target_ongoing_requests}}
    engine = serve.deployment(
        EngineReplica, name="engine",
        max_ongoing_requests=layout.max_ongoing_requests or int(server["max_running"]),
        ray_actor_options={"num_cpus": layout.replica_cpus, "runtime_env": {"env_vars": env}},
        **scaling,
    )
    ingress = serve.deployment(
        serve.ingress()(Ingress), name="ingress", num_replicas=layout.ingress_replicas,
        max_ongoing_requests=int(server["max_queue"]) + int(server["max_running"]),
        ray_actor_options={"num_cpus": layout.ingress_cpus,
                           "runtime_env": {"env_vars": {**env, "OMP_NUM_THREADS": "1"}}},
    )
    return ingress.bind(engine.bind(args), args)


def build_app(config: ServerConfig, ray_settings: RaySettings | None = None) -> Any:
    """The bound application for ``config`` (see `app_builder`)."""
    return app_builder(settings_dict(config, ray_settings or RaySettings()))


def write_config(path: Path, config: ServerConfig, ray_settings: RaySettings) -> Path:
    """Write a ``serve run`` / ``RayService`` config file for this application.

    ``--api-keys`` names the file's path where the replicas run (it need not exist here).

    Raises:
        InvalidInput: A non-local ``--host`` without ``--api-keys``.
    """
    import yaml

    from serve.server import LOCAL_HOSTS

    if config.api_keys is None and config.host not in LOCAL_HOSTS:
        raise InvalidInput(f"--host {config.host} without --api-keys: an open server may only "
                           f"bind {', '.join(LOCAL_HOSTS)}", fix="Pass --api-keys PATH (the "
                           "keys file's path inside the Ray containers).", param="host")

    settings = settings_dict(config, ray_settings)
    settings["server"]["cache"] = None  # this machine's folders stay out of a published file
    document = {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.host, "port": config.port},
        "applications": [{"name": APP_NAME, "route_prefix": "/",
                          "import_path": "serve.ray.app:app_builder", "args": settings}],
    }
    header = "# serve run " + Path(path).name + "   (written by loradock serve --ray-config)\n"
    Path(path).write_text(header + yaml.safe_dump(document, sort_keys=False))
    return Path(path)


def run_ray(config: ServerConfig, ray_settings: RaySettings) -> None:
    """Deploy on Ray (``RAY_ADDRESS``'s cluster, else a local one) and serve until a signal.

    Raises:
        InvalidInput: Bad configuration (all problems at once).
    """
    config.check()
    ray_settings.check()
    require_ray()
    import ray
    from ray import serve

    from serve.server import configure_logging

    configure_logging(config.log_level)
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             log_to_driver=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config, ray_settings), name=APP_NAME, route_prefix="/")
    log.info("serving on http://%s:%d through Ray Serve", config.host, config.port)
    stop.wait()
    log.info("stopping: Ray Serve drains the replicas")
    serve.shutdown()
    ray.shutdown()
