"""Latency under load: many clients over more adapters than fit, through a real server.

    nice -n 10 .venv/bin/python bench/serve_load.py                 # 64 clients, 60 s
    nice -n 10 .venv/bin/python bench/serve_load.py --duration 20   # a shorter run

``loradock serve`` (peft engine, ``--max-adapters`` resident) runs on 127.0.0.1 with
``--adapters`` rank-16 all-linear adapters registered (twice as many as fit, so the server keeps
loading and evicting). ``--clients`` asyncio clients each send streamed chat requests, one after
another, through the official ``openai`` client, to a random adapter (or the base), asking for
``--max-tokens`` tokens, for ``--duration`` seconds; meanwhile a new version of one adapter is
registered every ``--swap-every`` seconds (requests for ``NAME`` resolve to the newest). The
loop is bounded in time and count and only talks to 127.0.0.1.

Prints p50/p99 latency (request to last token) and time to first token, tokens/s, and every
request that did not end normally: 429s (the server's backpressure, retried by the client
after Retry-After), other errors, and lost ones (a stream that ended without a finish reason).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QUESTIONS = ["Name three colours of the rainbow.", "Write a haiku about rain.",
             "Why is the sky blue?", "Tell me a fun fact about cats.", "Say hello in French.",
             "What is the capital of Italy?", "Count from one to five.", "Define gravity."]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values`` (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def client_loop(url: str, models: list[str], args, stats: dict, stop_at: float,
                      seed: int) -> None:
    """One client: streamed requests back to back until ``stop_at``."""
    import openai

    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                timeout=600)
    try:
        while time.monotonic() < stop_at:
            model = rng.choice(models)
            started = time.perf_counter()
            first, tokens, finish = 0.0, 0, None
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": rng.choice(QUESTIONS)}],
                    max_tokens=args.max_tokens, temperature=0, stream=True)
                async for chunk in stream:
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    if choice.delta.content:
                        tokens += 1
                        first = first or time.perf_counter() - started
                    finish = choice.finish_reason or finish
            except openai.RateLimitError:
                stats["429"] += 1
                await asyncio.sleep(1.0)
                continue
            except openai.APIError as exc:
                stats["errors"].append(f"{model}: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            if finish is None:
                stats["lost"] += 1
                continue
            stats["latency"].append(time.perf_counter() - started)
            stats["ttft"].append(first)
            stats["tokens"] += tokens
            if tokens >= args.max_tokens:
                stats["full_latency"].append(time.perf_counter() - started)
    finally:
        await client.close()


async def swapper(home: Path, sources: list[Path], names: list[str], every: float,
                  stop_at: float, stats: dict) -> None:
    """Register a new version of one adapter every ``every`` seconds (hot swap)."""
    env = {**os.environ, "LORADOCK_HOME": str(home), "PYTHONPATH": str(REPO)}
    i = 0
    while time.monotonic() + every < stop_at:
        await asyncio.sleep(every)
        name, source = names[i % len(names)], sources[i % len(sources)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loradock.cli", "hub", "register", str(source), "--name", name,
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stats["swaps"] += int(await proc.wait() == 0)
        i += 1


async def run(args, url: str, home: Path, sources: list[Path], names: list[str]) -> dict:
    stats = {"latency": [], "ttft": [], "full_latency": [], "tokens": 0, "429": 0,
             "errors": [], "lost": 0, "swaps": 0}
    models = ["smollm2"] + [f"smollm2+{n}" for n in names]
    started = time.monotonic()
    stop_at = started + args.duration
    await asyncio.gather(
        *(client_loop(url, models, args, stats, stop_at, seed) for seed in range(args.clients)),
        swapper(home, sources, names, args.swap_every, stop_at, stats))
    stats["wall_s"] = time.monotonic() - started
    return stats


def engine_counters(url: str) -> dict[str, float]:
    """Where the server's time went: the peft engine's counters from ``/metrics``."""
    import httpx

    raw = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("loradock_peft_"):
            name, value = line.split()
            raw[name.removeprefix("loradock_peft_")] = float(value)
    steps = raw.get("steps", 0) or 1
    return {
        "decode_steps": raw.get("steps", 0), "mean_decode_batch": round(
            raw.get("decode_rows", 0) / steps, 1),
        "mean_step_ms": round(1e3 * raw.get("mean_step_s", 0), 1),
        "decode_s": round(raw.get("decode_s", 0), 1),
        "prefill_s": round(raw.get("prefill_s", 0), 1),
        "prefill_tokens": raw.get("prefill_tokens", 0),
        "prefix_hit_tokens": raw.get("prefix_hit_tokens", 0),
        "generated_tokens": raw.get("generated_tokens", 0),
        "adapter_loads": raw.get("adapter_loads", 0),
        "adapter_host_hits": raw.get("adapter_host_hits", 0),
        "adapter_load_s_total": round(raw.get("adapter_load_s_total", 0), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--max-adapters", type=int, default=8, help="resident at once")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--swap-every", type=float, default=1.0)
    parser.add_argument("--max-running", type=int, default=64,
                        help="the server's batch slots (64: every client can be decoding; 32 "
                        "kept half of them queued: p50 3.20 s against 2.88-3.13 s at 64, same "
                        "code, 2 cores with AVX-512 and AMX)")
    parser.add_argument("--threads", type=int, default=0, help="the server's torch threads "
                        "(0: its default, all cores)")
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to the server (e.g. host_adapters=32); repeatable")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from hub.store import Store
    from tests.factories import load_base_model, make_lora
    from tests.serve.helpers import start_server

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    home = work / "home"
    try:
        store = Store(home, cache=REPO / ".cache" / "test" / "bases")
        base = store.base("smollm2")
        model = load_base_model(base)
        sources, names = [], []
        for i in range(args.adapters):
            folder = make_lora(model, work / f"lora-{i}", r=16, targets="all-linear", seed=i,
                               scale=0.05)
            names.append(f"load{i}")
            sources.append(folder)
            store.register(folder, names[-1])
        del model
        server = start_server(home, engine="peft", args=[
            "--max-adapters", str(args.max_adapters), "--max-running", str(args.max_running),
            "--max-queue", "256", "--max-model-len", "512", "--threads", str(args.threads),
            *(arg for pair in args.engine_option for arg in ("--engine-option", pair))])
        try:
            stats = asyncio.run(run(args, server.url, home, sources, names))
            engine = engine_counters(server.url)
        finally:
            server.stop()
        lat, ttft, full = stats["latency"], stats["ttft"], stats["full_latency"]
        summary = {
            "requests_ok": len(lat), "tokens_per_s": round(stats["tokens"] / stats["wall_s"], 1),
            "p50_latency_s": round(percentile(lat, 0.5), 3),
            "p99_latency_s": round(percentile(lat, 0.99), 3),
            f"p50_latency_{args.max_tokens}_tokens_s": round(percentile(full, 0.5), 3),
            f"p99_latency_{args.max_tokens}_tokens_s": round(percentile(full, 0.99), 3),
            "p50_ttft_s": round(percentile(ttft, 0.5), 3),
            "p99_ttft_s": round(percentile(ttft, 0.99), 3),
            "rate_limited_429": stats["429"], "other_errors": len(stats["errors"]),
            "lost": stats["lost"], "hot_swaps": stats["swaps"],
            "first_errors": stats["errors"][:5],
            "engine": engine,
        }
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
