"""``loradock serve``: the OpenAI-compatible multi-LoRA server (flags -> `serve.server`).

Thin on purpose: parse flags, build `serve.server.ServerConfig`, call `run_server`. Nothing heavy
is imported until the command runs. ``python -m loradock.cli_serve ...`` runs the same command on
its own (the test helpers use it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from hub.errors import InvalidInput, LoradockError

DtypeName = Literal["auto", "nf4", "nf4-dense", "fp32", "bf16", "fp16"]


def _options(pairs: list[str]) -> dict[str, object]:
    """Parse ``KEY=VALUE`` pairs; JSON scalars (``256``, ``0.5``, ``true``) become typed."""
    import json

    options: dict[str, object] = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key:
            raise InvalidInput(f"--engine-option {pair!r} is not KEY=VALUE",
                               fix="Write e.g. --engine-option prefill_chunk=256.",
                               param="engine_option")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        options[key] = value if isinstance(value, bool | int | float) else text
    return options


def serve(
    engine: Annotated[str, typer.Option(
        help="Inference engine: peft (embedded, CPU/GPU), vllm or llamacpp.")] = "peft",
    base: Annotated[str, typer.Option(help="Base model name in the hub.")] = "smollm2",
    host: Annotated[str, typer.Option(
        help="Address to bind. Without --api-keys only 127.0.0.1, localhost or ::1.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    base_dtype: Annotated[DtypeName, typer.Option(
        help="Base weights: nf4 (bitsandbytes 4-bit), nf4-dense (the same 4-bit values in "
             "dense layers), fp32, bf16, fp16, or auto (peft: nf4 on CUDA, nf4-dense on CPU, "
             "the values QLoRA adapters trained on).")] = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    max_adapters: Annotated[int, typer.Option(
        help="Adapters resident at once (least recently used idle one evicted).")] = 8,
    max_running: Annotated[int, typer.Option(
        help="Sequences decoded together in one forward pass.")] = 16,
    max_queue: Annotated[int, typer.Option(
        help="Requests waiting for a slot before new ones get 429.")] = 64,
    max_model_len: Annotated[int, typer.Option(
        help="Longest prompt + completion in tokens (capped by the base's context).")] = 2048,
    max_lora_rank: Annotated[int, typer.Option(help="Largest LoRA rank accepted.")] = 64,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: default).")] = 0,
    api_keys: Annotated[Path | None, typer.Option(
        help="YAML file mapping each API key to the adapter patterns it may use and an admin "
             "flag. Required to bind a non-local address.")] = None,
    request_timeout_s: Annotated[float, typer.Option(
        help="Per-request limit from arrival to the last token (504 after it).")] = 600.0,
    drain_timeout_s: Annotated[float, typer.Option(
        help="On SIGTERM, how long running requests may take to finish.")] = 30.0,
    max_body_kb: Annotated[int, typer.Option(
        help="Largest request body in KiB (413 over it).")] = 2048,
    engine_option: Annotated[list[str] | None, typer.Option(
        help="Engine-specific KEY=VALUE setting (repeatable).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    remote: Annotated[str | None, typer.Option(
        help="Pull an adapter the local store lacks from this hub on its first request: hf "
             "(HF_TOKEN's user) or hf:ORG; repo ORG/NAME, tag vN, digest-checked, then cached. "
             "Replicas then need no shared volume.")] = None,
    ui: Annotated[bool, typer.Option(
        "--ui/--no-ui", help="Serve the web console at / (hub, cards, playground).")] = True,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Scale out on Ray Serve (install the ray extra of loradock): the same API in "
             "front of engine replicas routed by adapter (model multiplexing, --max-adapters "
             "per replica); RAY_ADDRESS picks the cluster. No console.")] = False,
    replicas: Annotated[int, typer.Option(
        help="With --ray: engine replicas (the minimum when --max-replicas is set).")] = 1,
    max_replicas: Annotated[int, typer.Option(
        help="With --ray: autoscale up to this many replicas on ongoing requests.")] = 0,
    replica_cpus: Annotated[float, typer.Option(
        help="With --ray: CPUs each engine replica reserves.")] = 1.0,
    ray_config: Annotated[Path | None, typer.Option(
        help="With --ray: write the `serve run` config YAML here and exit.")] = None,
) -> None:
    """Serve the base and every hub adapter with an OpenAI-compatible API.

    Call it with model="BASE", "BASE+ADAPTER" or "BASE+ADAPTER@VERSION". Stops cleanly on
    SIGTERM: running requests finish, then the process exits 0.

    Example: loradock serve --engine peft --base smollm2 --port 8000
    """
    from serve.server import ServerConfig, run_server

    config = ServerConfig(
        engine=engine, base=base, host=host, port=port, base_dtype=base_dtype, device=device,
        max_adapters=max_adapters, max_running=max_running, max_queue=max_queue,
        max_model_len=max_model_len, max_lora_rank=max_lora_rank, threads=threads,
        api_keys=api_keys, request_timeout_s=request_timeout_s, drain_timeout_s=drain_timeout_s,
        max_body_bytes=max_body_kb * 1024, engine_options=_options(engine_option or []),
        remote=remote,
        log_level=log_level, ui=ui and not ray,
    )
    if ray:  # imported only here: the default install never imports ray
        from serve.ray.app import RaySettings, run_ray, write_config

        layout = RaySettings(replicas=replicas, max_replicas=max_replicas,
                             replica_cpus=replica_cpus)
        if ray_config is not None:
            layout.check()
            print(write_config(ray_config, config, layout))
            return
        run_ray(config, layout)
        return
    run_server(config)


def main(argv: list[str] | None = None) -> None:
    """Run ``serve`` as a stand-alone command (domain errors: one line, their exit code)."""
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(serve)
    try:
        app(args=argv, standalone_mode=False)
    except LoradockError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
