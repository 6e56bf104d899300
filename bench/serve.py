"""Benchmark the peft engine in-process; every figure is measured in this run, ratios in-run.

    nice -n 10 .venv/bin/python bench/serve.py            # full run (~6 min on 2 quiet cores)
    nice -n 10 .venv/bin/python bench/serve.py --quick    # smaller workload, for a smoke check

Workload: ``--requests`` chat prompts submitted at once, each generating exactly
``--max-tokens`` greedy tokens, on the real SmolLM2 base with 8 real rank-``--rank`` PEFT
adapters on every linear layer (all-linear) and 8 on q/k/v/o. Prints:

- the compute dtype ``auto`` chose on this CPU and why (`serve.runtime.dtype_choice`);
- tokens/s for the base, one adapter, mixed over 8 all-linear adapters, mixed over 8 q/k/v/o
  adapters, and single-stream (one request, base and with an adapter), with mixed / one;
- **efficiency** at batch 1, 16 and 32: the time of the model's matmuls alone (its fused
  projections and lm_head, ``F.linear`` at that batch and dtype, on weights of the same shapes)
  divided by the measured decode step time, both timed here, interleaved; beside it the same
  matmuls through the engine's own kernel (oneDNN-reordered weights where that measured faster),
  so the part of a step outside matmuls is visible too;
- time to first token of a cold adapter (not resident; the first one after start, and a later
  one) minus a warm one's, and the adapter load time;
- resident memory per adapter: RSS growth per loaded adapter over its file size;
- the throughput cost of JSON-constrained rows in a mixed batch (`constrained_cost`; goal
  <= 15 %); ``--constrained-only`` measures just that (~1-2 min).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QUESTIONS = [
    "Name three colours of the rainbow.", "What is two plus two?", "Say hello in French.",
    "Give me a word that rhymes with cat.", "What is the capital of Italy?",
    "Write a haiku about rain.", "How many legs does a spider have?", "What is water made of?",
    "Suggest a name for a dog.", "What day comes after Monday?", "Define the word gravity.",
    "List two fruits that are red.", "What is the opposite of hot?", "Count from one to five.",
    "Why is the sky blue?", "Tell me a fun fact about cats.",
]


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def requests(prompts, records, max_tokens: int, tag: str):
    """One greedy request per prompt; ``records[i % len]`` (None: the base)."""
    from serve.engine import GenerationRequest, SamplingParams

    return [GenerationRequest(f"{tag}-{i}-{time.monotonic_ns()}", prompt,
                              records[i % len(records)],
                              SamplingParams(max_tokens=max_tokens, temperature=0.0))
            for i, prompt in enumerate(prompts)]


async def throughput(engine, reqs) -> float:
    """Submit all at once; generated tokens per wall second (prefill included)."""
    started = time.perf_counter()

    async def one(req):
        return sum([len(c.token_ids) async for c in engine.generate(req)])

    tokens = sum(await asyncio.gather(*(one(r) for r in reqs)))
    return tokens / (time.perf_counter() - started)


async def first_token_s(engine, request) -> tuple[float, float]:
    """Seconds to the first chunk, and the adapter load time it reported."""
    started = time.perf_counter()
    stream = engine.generate(request)
    first = await stream.__anext__()
    elapsed = time.perf_counter() - started
    async for _ in stream:
        pass
    return elapsed, first.adapter_load_s


def efficiency(runner, batches: list[int], repeats: int) -> dict[int, dict[str, float]]:
    """Matmul-only time / decode step time at each batch (base rows, position ~64)."""
    import torch
    import torch.nn.functional as F

    from serve.runtime.runner import DecodeRows

    out = {}
    prompt = list(range(100, 164))
    # F.linear's reference: dense weights of the engine's shapes, in its dtype.
    dense = [(name, torch.randn(sum(runner.shapes[name][1]), runner.shapes[name][0],
                                dtype=runner.dtype) * 0.02)
             for _ in runner.layers for name in ("qkv", "o", "gate_up", "down")]
    dense.append(("qkv", torch.randn(runner.vocab_size, runner.shapes["qkv"][0],
                                     dtype=runner.dtype) * 0.02))
    with torch.inference_mode():
        for n in batches:
            runner.cache.shrink(0)
            for _ in range(n):
                runner.cache.allocate()
            runner.forward(None, [(i, prompt, 0, -1) for i in range(n)])
            decode = DecodeRows([7] * n, [len(prompt)] * n, [-1] * n)
            inputs = {name: torch.randn(n, runner.shapes[name][0], dtype=runner.dtype)
                      for name in runner.shapes}

            def matmuls(inputs=inputs):
                for name, w in dense:
                    F.linear(inputs[name], w)

            def engine_matmuls(inputs=inputs):
                for layer in runner.layers:
                    for name in ("qkv", "o", "gate_up", "down"):
                        getattr(layer, name)(inputs[name])
                runner.lm_head(inputs["qkv"])

            steps, mms, engine_mms = [], [], []
            for i in range(repeats + 2):
                started = time.perf_counter()
                runner.forward(decode, [])
                step = time.perf_counter() - started
                started = time.perf_counter()
                matmuls()
                mm = time.perf_counter() - started
                started = time.perf_counter()
                engine_matmuls()
                engine_mm = time.perf_counter() - started
                if i >= 2:
                    steps.append(step)
                    mms.append(mm)
                    engine_mms.append(engine_mm)
            step, mm = statistics.median(steps), statistics.median(mms)
            engine_mm = statistics.median(engine_mms)
            out[n] = {"step_ms": step * 1e3, "matmul_ms": mm * 1e3, "efficiency": mm / step,
                      "engine_matmul_ms": engine_mm * 1e3}
            runner.cache.shrink(0)
    return out


def engine_config(args, base, rows: int):
    """The peft engine both measurements start: the command line's dtypes, kernels, threads."""
    from serve.engine import EngineConfig

    return EngineConfig(
        base=base, base_dtype=args.base_dtype, max_running=max(32, rows), max_adapters=8,
        max_model_len=1024, threads=args.threads,
        options={"compute_dtype": args.compute_dtype, "lora_dtype": args.lora_dtype,
                 "lora_kernel": args.lora_kernel,
                 "single_thread_rows": args.single_thread_rows})


async def bench(args, base, prompts, sets: dict, results: dict) -> None:
    """Throughput, single stream, TTFT and memory on one engine with ``auto`` dtype."""
    from serve.engine import GenerationRequest, SamplingParams, create_engine

    engine = create_engine("peft", engine_config(args, base, len(prompts)))
    await engine.start()
    try:
        results["engine"] = engine.health().detail
        # Each TTFT request asks a new question (prompts[i]), so no prompt is whole in the
        # prefix cache; warm and cold differ only in whether the adapter is resident.
        one_req = lambda record, i: GenerationRequest(  # noqa: E731
            f"ttft-{time.monotonic_ns()}", prompts[i % len(prompts)], record,
            SamplingParams(max_tokens=2, temperature=0.0))
        heavy = sets["all_linear"]
        rss0 = rss_bytes()
        cold_first, load_first = await first_token_s(engine, one_req(heavy[0], 0))
        warm = min([(await first_token_s(engine, one_req(heavy[0], i)))[0] for i in (1, 2, 3)])
        cold_later, load_later = await first_token_s(engine, one_req(heavy[1], 4))
        for record in heavy[2:]:
            await engine.load_adapter(record)
        rss1 = rss_bytes()
        file_bytes = sum((Path(r.path) / "adapter_model.safetensors").stat().st_size
                         for r in heavy) / len(heavy)
        results["ttft"] = {"warm_s": warm, "cold_first_s": cold_first,
                           "cold_first_load_s": load_first, "cold_later_s": cold_later,
                           "cold_later_load_s": load_later}
        slot_bytes = engine.stats()["lora_stack_bytes"] / 8  # the pools hold 8 adapters each
        results["memory"] = {"rss_growth_per_adapter": (rss1 - rss0) / len(heavy),
                             "pool_bytes_per_adapter": slot_bytes, "file_bytes": file_bytes,
                             "ratio": slot_bytes / file_bytes}
        await throughput(engine, requests(prompts[:4], [None], 4, "warm"))
        runs: dict[str, list[float]] = {}
        workloads = {
            "base": [None], "one": heavy[:1], "mixed_all_linear": heavy,
        }
        for _ in range(args.repeats):
            for label, records in workloads.items():
                runs.setdefault(label, []).append(await throughput(
                    engine, requests(prompts, records, args.max_tokens, label)))
        for key in engine.health().resident_adapters:  # the q/k/v/o set
            await engine.unload_adapter(key)
        for _ in range(args.repeats):
            for label, records in (("one_qkvo", sets["qkvo"][:1]),
                                   ("mixed_qkvo", sets["qkvo"])):
                runs.setdefault(label, []).append(await throughput(
                    engine, requests(prompts, records, args.max_tokens, label)))
            for label, records in (("single_base", [None]), ("single_adapter", heavy[:1])):
                runs.setdefault(label, []).append(await throughput(
                    engine, requests(prompts[:1], records, args.max_tokens, label)))
        results["tok_s"] = {label: max(values) for label, values in runs.items()}
        results["efficiency"] = efficiency(engine._runner, [1, 16, 32], args.repeats * 3)
    finally:
        await engine.shutdown(drain_timeout_s=5)


async def constrained_cost(args, base, prompts, records) -> dict[str, float]:
    """Tokens/s of a batch with half its rows JSON-constrained, against the same batch free.

    Same prompts, adapters (round-robin) and ``--max-tokens`` greedy tokens per row in both
    workloads; the constrained rows follow an array of at least ``max_tokens`` integers, so
    they never finish early and every step pays xgrammar's bitmask and the masking.
    """
    from serve.chat import Formatter
    from serve.engine import create_engine

    schema = {"type": "array", "minItems": args.max_tokens,
              "items": {"type": "integer", "minimum": 0, "maximum": 99}}
    constraint = Formatter(base).grammars.json_schema(schema, param="bench")
    engine = create_engine("peft", engine_config(args, base, len(prompts)))
    await engine.start()
    try:
        await throughput(engine, requests(prompts[:4], records, 4, "warm-constrained"))
        runs: dict[str, list[float]] = {"free": [], "mixed": []}
        cpu: dict[str, list[float]] = {"free": [], "mixed": []}
        for _ in range(max(2, args.repeats)):
            for label in runs:
                reqs = requests(prompts, records, args.max_tokens, f"c-{label}")
                if label == "mixed":
                    for req in reqs[::2]:
                        req.params.constraint = constraint
                started = time.process_time()
                runs[label].append(await throughput(engine, reqs))
                cpu[label].append(time.process_time() - started)
    finally:
        await engine.shutdown(drain_timeout_s=5)
    free, mixed = max(runs["free"]), max(runs["mixed"])
    cpu_free, cpu_mixed = min(cpu["free"]), min(cpu["mixed"])  # same tokens in both
    return {"free_tok_s": free, "mixed_tok_s": mixed, "cost": 1 - mixed / free,
            "cpu_cost": 1 - cpu_free / cpu_mixed,
            "constrained_rows": len(prompts[::2]), "rows": len(prompts),
            **_sampler_ms(constraint, len(prompts))}


def _sampler_ms(constraint, rows: int, steps: int = 64) -> dict[str, float]:
    """`serve.runtime.sampling.sample` alone per step: all rows free vs every other one masked."""
    import torch

    from serve.engine import SamplingParams
    from serve.runtime.sampling import new_row, sample

    logits = torch.randn(rows, constraint.vocab_size)
    out = {}
    for label, every in (("sampler_free_ms", 0), ("sampler_mixed_ms", 2)):
        states = [new_row(SamplingParams(temperature=0.0, constraint=constraint
                                         if every and i % every == 0 else None), [1])
                  for i in range(rows)]
        started = time.perf_counter()
        for _ in range(steps):
            sample(logits, states)
        out[label] = (time.perf_counter() - started) / steps * 1e3
    return out


def report_constrained(c: dict[str, float], args) -> None:
    print(f"constrained rows: {c['constrained_rows']} of {c['rows']} JSON-constrained: "
          f"{c['mixed_tok_s']:.1f} tok/s vs {c['free_tok_s']:.1f} all free -> cost "
          f"{c['cost'] * 100:.1f} % in wall time, {c['cpu_cost'] * 100:.1f} % in CPU time "
          "(goal <= 15 %)")
    print(f"sampler per step, {c['rows']} rows: {c['sampler_free_ms']:.1f} ms free, "
          f"{c['sampler_mixed_ms']:.1f} ms with {c['constrained_rows']} masked")


def report(results: dict, args) -> None:
    t = results["tok_s"]
    print(f"\n== peft engine, {args.requests} requests x {args.max_tokens} tokens, rank "
          f"{args.rank} adapters ==")
    print(f"engine: {results['engine']}")
    for label, value in t.items():
        print(f"{label:>18}: {value:7.1f} tok/s")
    print(f"mixed / one (all-linear, 8 adapters): {t['mixed_all_linear'] / t['one']:.2f}")
    print(f"mixed / one (q/k/v/o, 8 adapters):    {t['mixed_qkvo'] / t['one_qkvo']:.2f}")
    print(f"one / base (all-linear):              {t['one'] / t['base']:.2f}")
    for n, e in results["efficiency"].items():
        print(f"efficiency batch {n:>2}: {e['efficiency']:.2f} (F.linear matmuls "
              f"{e['matmul_ms']:.1f} ms / step {e['step_ms']:.1f} ms; the engine's own kernel: "
              f"{e['engine_matmul_ms']:.1f} ms, {e['engine_matmul_ms'] / e['step_ms']:.2f} "
              "of the step)")
    tt = results["ttft"]
    first, later = tt["cold_first_s"] - tt["warm_s"], tt["cold_later_s"] - tt["warm_s"]
    print(f"TTFT warm {tt['warm_s'] * 1e3:.0f} ms; a cold adapter adds {first * 1e3:.0f} ms for "
          f"the first after start (load {tt['cold_first_load_s'] * 1e3:.0f} ms), "
          f"{later * 1e3:.0f} ms later (load {tt['cold_later_load_s'] * 1e3:.0f} ms)")
    m = results["memory"]
    print(f"memory per adapter: {m['pool_bytes_per_adapter'] / 2**20:.1f} MiB in its pool slot "
          f"(RSS growth {m['rss_growth_per_adapter'] / 2**20:.1f} MiB; the rank-16 pool is "
          f"allocated at start), file {m['file_bytes'] / 2**20:.1f} MiB, ratio {m['ratio']:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--base-dtype", default="auto")
    parser.add_argument("--compute-dtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="the peft engine's compute dtype (auto: measured at start); fp32 "
                        "is what a CPU without native bf16 gets")
    parser.add_argument("--lora-dtype", default="compute", choices=("auto", "compute", "fp32"))
    parser.add_argument("--lora-kernel", default="auto", choices=("auto", "native", "torch"),
                        help="the multi-LoRA delta's kernel (auto: measured at start)")
    parser.add_argument("--single-thread-rows", type=int, default=-1,
                        help="passes of at most this many tokens on one thread (-1: measured, "
                             "0: all threads always); see serve.runtime.threads_choice")
    parser.add_argument("--quick", action="store_true", help="8 requests x 16 tokens, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--constrained-only", action="store_true",
                        help="measure only the cost of JSON-constrained rows in a mixed batch")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens, args.repeats = 8, 16, 1

    from transformers import AutoTokenizer

    from hub.store import Store
    from tests.factories import load_base_model, make_lora

    home = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    cache = REPO / ".cache" / "test" / "bases"
    store = Store(home, cache=cache if cache.is_dir() else None)
    base = store.base("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
               for q in (QUESTIONS * 4)[:args.requests]]
    base_model = load_base_model(base)
    sets = {}
    for label, targets in (("all_linear", "all-linear"),
                           ("qkvo", ["q_proj", "k_proj", "v_proj", "o_proj"])):
        sets[label] = [store.register(make_lora(base_model, home / f"{label}-{i}", seed=i,
                                                r=args.rank, alpha=2 * args.rank,
                                                targets=targets), f"{label.replace('_', '-')}-{i}")
                       for i in range(8)]
    del base_model
    # The adapters were just written: flush them now, so the kernel's writeback of those
    # hundreds of MB does not run on these two cores during the first timed loads.
    os.sync()
    results: dict = {"args": vars(args) | {"json": str(args.json)}}
    if not args.constrained_only:
        asyncio.run(bench(args, base, prompts, sets, results))
        report(results, args)
    results["constrained"] = asyncio.run(constrained_cost(args, base, prompts, sets["qkvo"]))
    report_constrained(results["constrained"], args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
