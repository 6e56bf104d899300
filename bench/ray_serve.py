"""Ray Serve scale-out on one machine: 2 engine replicas against 1 on the same cores, cold TTFT.

    nice -n 10 .venv/bin/python bench/ray_serve.py                # about 2-3 minutes
    nice -n 10 .venv/bin/python bench/ray_serve.py --requests 8   # a shorter run
    nice -n 10 .venv/bin/python bench/ray_serve.py --recheck      # single again at the end

Adapters (rank 8, q/v) are published on the stand-in Hub on 127.0.0.1 (`tests.hub.standin_hub`)
and pulled lazily by the replicas. Three servers run one after another on the same cores
(``ray.init(num_cpus=2)``, each engine replica ``OMP_NUM_THREADS=1``):

- ``single``: ``loradock serve`` in its own process (peft, fp32, ``--threads 1``), the baseline;
- ``ray x1``: the Ray Serve app with 1 engine replica (the cost of the extra hop, against the
  gain of the HTTP front running in another process than the engine);
- ``ray x2``: 2 engine replicas (no gain expected from more processes on the same 2 cores).

Each gets ``--requests`` streamed greedy chat requests at once over ``--adapters`` adapters
(after one warm request per adapter) and reports completion tokens/s and the ratio to
``single``. Right after ``ray x1`` is deployed, its first request is for an adapter no replica
has pulled: time to first token for a cold adapter on a fresh replica (pull + verify + load +
prefill), then the same adapter warm.

Where the job ends: measuring; the deployments are `serve.ray`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["OMP_NUM_THREADS"] = "1"
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TOKEN = "hf_standin_bench_token_1234567890"
CARD = ("---\ndraft: false\nlicense: apache-2.0\n"
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n# bench\n")
QUESTIONS = ["Name three colours of the rainbow.", "Write a haiku about rain.",
             "Why is the sky blue?", "Say hello in French."]


async def one(client, model: str, question: str, max_tokens: int) -> tuple[float, int]:
    """One streamed greedy request: (seconds to first token, completion tokens)."""
    started = time.monotonic()
    first = 0.0
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if not first and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first, tokens


async def load(url: str, models: list[str], requests: int, max_tokens: int) -> float:
    """Completion tokens/s of ``requests`` streamed requests sent at once."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                timeout=600)
    for model in models:  # warm: every adapter resident before timing
        await one(client, model, QUESTIONS[0], 2)
    started = time.monotonic()
    results = await asyncio.gather(*[
        one(client, models[i % len(models)], QUESTIONS[i % len(QUESTIONS)], max_tokens)
        for i in range(requests)])
    elapsed = time.monotonic() - started
    await client.close()
    return sum(tokens for _, tokens in results) / elapsed


async def cold(url: str) -> tuple[float, float]:
    """TTFT of the first request for adapter ``cold`` (never loaded anywhere), then warm."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                timeout=600)
    first, _ = await one(client, "smollm2+cold", QUESTIONS[1], 4)
    warm, _ = await one(client, "smollm2+cold", QUESTIONS[1], 4)
    await client.close()
    return first, warm


@contextlib.contextmanager
def single_server(home: Path) -> Iterator[str]:
    """``loradock serve`` in its own process (as the replicas are), pulling from the remote."""
    import httpx

    from tests.serve.helpers import free_port

    port = free_port()
    env = {**os.environ, "LORADOCK_HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loradock.cli_serve", "--engine", "peft", "--base-dtype", "fp32",
         "--threads", "1", "--port", str(port), "--remote", "hf:acme", "--max-adapters", "2",
         "--max-running", "16", "--no-ui", "--log-level", "warning"], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "single server failed"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


def publish(publisher, folders: Path, factory, name: str, seed: int) -> None:
    """Register a random rank-8 adapter as ``name`` and push it to the stand-in Hub."""
    from hub import remote

    folder = folders / name
    factory(folder, seed)
    (folder / "README.md").write_text(CARD)
    remote.push(publisher, publisher.register(folder, name), f"acme/{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--recheck", action="store_true",
                        help="Measure single again at the end; compare with the mean (+20 s).")
    args = parser.parse_args()

    import huggingface_hub.constants
    import ray
    from ray import serve

    from hub.store import Store
    from serve.ray.app import APP_NAME, RaySettings, build_app
    from serve.server import ServerConfig
    from tests.factories import load_base_model, make_lora
    from tests.hub.standin_hub import StandInHub
    from tests.serve.helpers import free_port

    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    cache = Path(os.environ.get("LORADOCK_TEST_CACHE", REPO / ".cache" / "test")) / "bases"
    with StandInHub(TOKEN) as hub:
        os.environ.update({"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
                           "HF_HUB_DISABLE_XET": "1", "LORADOCK_CACHE": str(cache)})
        huggingface_hub.constants.HF_HUB_OFFLINE = False
        huggingface_hub.constants.HF_HUB_DISABLE_XET = True
        publisher = Store(root / "publisher", cache=cache)
        base_model = load_base_model(publisher.base("smollm2"))

        def factory(folder: Path, seed: int) -> None:
            make_lora(base_model, folder, seed=seed)

        (root / "folders").mkdir()
        names = [f"bench{i}" for i in range(args.adapters)]
        for i, name in enumerate(names):
            publish(publisher, root / "folders", factory, name, seed=i + 1)
        models = [f"smollm2+{name}" for name in names]
        publish(publisher, root / "folders", factory, "cold", seed=99)
        config = ServerConfig(engine="peft", base_dtype="fp32", threads=1, max_adapters=2,
                              max_running=16, remote="hf:acme", home=root / "home", ui=False,
                              port=0)
        figures: dict[str, float] = {}
        with single_server(root / "single") as url:
            figures["single"] = asyncio.run(load(url, models, args.requests, args.max_tokens))
        print(f"single   {figures['single']:7.1f} tok/s", flush=True)
        port = free_port()
        ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
        ray.init(num_cpus=2, include_dashboard=False, logging_level="error", _temp_dir=ray_tmp)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}"
            for replicas in (1, 2):
                layout = RaySettings(replicas=replicas, replica_cpus=0.5, ingress_cpus=0.5,
                                     max_ongoing_requests=16 // replicas)
                started = time.monotonic()
                serve.run(build_app(config, layout), name=APP_NAME, route_prefix="/")
                ready = time.monotonic() - started
                if replicas == 1:  # the replica just started; "cold" never pulled anywhere
                    first, warm = asyncio.run(cold(url))
                    print(f"cold adapter TTFT on a fresh replica {first * 1000:.0f} ms "
                          f"(pull + verify + load + prefill); warm {warm * 1000:.0f} ms",
                          flush=True)
                tps = asyncio.run(load(url, models, args.requests, args.max_tokens))
                figures[f"ray x{replicas}"] = tps
                print(f"ray x{replicas}   {tps:7.1f} tok/s  {tps / figures['single']:.2f}x of "
                      f"single  (deployed in {ready:.0f} s)", flush=True)
                serve.delete(APP_NAME)
        finally:
            serve.shutdown()
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
        baseline = figures["single"]
        if args.recheck:  # the drift of a shared machine over the run
            with single_server(root / "single-again") as single_url:
                again = asyncio.run(load(single_url, models, args.requests, args.max_tokens))
            print(f"single   {again:7.1f} tok/s (again, after the Ray runs)")
            baseline = (figures["single"] + again) / 2
        print(f"against single {baseline:.1f} tok/s: ray x1 "
              f"{figures['ray x1'] / baseline:.2f}x, ray x2 {figures['ray x2'] / baseline:.2f}x; "
              f"2 replicas / 1 replica on the same cores: "
              f"{figures['ray x2'] / figures['ray x1']:.2f}x")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
