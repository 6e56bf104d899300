"""Benchmark the peft engine in-process; every figure is a ratio against a baseline run here.

    nice -n 10 .venv/bin/python bench/serve.py            # full run (~10 min on 2 busy cores)
    nice -n 10 .venv/bin/python bench/serve.py --quick    # smaller workload, for a smoke check

Workload: ``--requests`` chat prompts submitted at once, each generating exactly
``--max-tokens`` greedy tokens (no stop token), on the real SmolLM2 base with 8 real PEFT
adapters (``--rank``, ``--targets``). Prints:

- tokens/s for base-only, one adapter, and mixed over 8 adapters (round-robin), with the ratios
  mixed / base and one / base, in wall time and in tokens per CPU-second (steadier when other
  processes share the cores); each workload is run ``--repeats`` times, interleaved, best kept;
- the mixed workload with each LoRA kernel (masked, sgmv, grouped, bmm, auto);
- mixed / base again with 8 adapters on every linear layer (all-linear), the heavy case;
- the same mixed workload on a naive server (PEFT ``set_adapter`` per request, serial
  ``generate``) and with PEFT's own mixed batch (``generate(adapter_names=...)``), as ratios;
- cold vs warm time to first token (adapter not resident vs resident);
- resident memory per adapter (unpadded tensors, stacked slot, and process RSS growth);
- nf4 and nf4-dense vs fp32 base: batched and single-stream decode tokens/s (why ``auto`` is
  nf4-dense, not bitsandbytes nf4, on CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


class Workload:
    """The same requests for every engine and baseline."""

    def __init__(self, prompts: list[list[int]], records: list, max_tokens: int,
                 heavy: list | None = None) -> None:
        self.prompts, self.records, self.max_tokens = prompts, records, max_tokens
        self.heavy = heavy or []

    def requests(self, mode: str, records: list | None = None):
        from serve.engine import GenerationRequest, SamplingParams

        records = records or self.records
        out = []
        for i, prompt in enumerate(self.prompts):
            record = {"base": None, "one": records[0],
                      "mixed": records[i % len(records)]}[mode]
            params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0)
            out.append(GenerationRequest(f"{mode}-{i}-{time.monotonic_ns()}", prompt, record,
                                         params))
        return out


async def run_engine(engine, requests) -> dict[str, float]:
    """Submit all requests at once.

    Returns tokens per wall second and per CPU second end to end (prefill included), and decode
    tokens per second of decode-pass time (from the engine's counters).
    """
    before = engine.stats()
    wall, cpu = time.perf_counter(), time.process_time()

    async def one(req):
        return sum([len(c.token_ids) async for c in engine.generate(req)])

    tokens = sum(await asyncio.gather(*(one(r) for r in requests)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = engine.stats()
    decode_s = after["decode_s"] - before["decode_s"]
    decode_cpu = after["decode_cpu_s"] - before["decode_cpu_s"]
    rows = after["decode_rows"] - before["decode_rows"]
    return {"tokens": tokens, "tok_s": tokens / wall, "tok_cpu_s": tokens / cpu,
            "decode_tok_s": rows / decode_s if decode_s else 0.0,
            "decode_tok_cpu_s": rows / decode_cpu if decode_cpu else 0.0}


async def ttft(engine, request) -> tuple[float, float]:
    """Seconds to the first chunk, and the adapter load time it reported."""
    started = time.perf_counter()
    stream = engine.generate(request)
    first = await stream.__anext__()
    elapsed = time.perf_counter() - started
    async for _ in stream:
        pass
    return elapsed, first.adapter_load_s


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    """Best of the runs per figure: other processes only ever slow a run down."""
    keys = ("tok_s", "tok_cpu_s", "decode_tok_s", "decode_tok_cpu_s")
    return {k: max(r.get(k, 0.0) for r in runs) for k in keys}


async def bench_engine(args, base, work: Workload, results: dict) -> None:
    from serve.engine import EngineConfig, GenerationRequest, SamplingParams, create_engine

    n = len(work.prompts)
    engine = create_engine("peft", EngineConfig(base=base, base_dtype="fp32", max_running=n,
                                                max_adapters=len(work.records),
                                                max_model_len=1024))
    await engine.start()
    try:
        await run_engine(engine, work.requests("base")[:2])  # warm-up: first pass allocations
        rss0 = rss_bytes()
        cold, warm = [], []
        for record in work.records[:2]:
            req = lambda r=record: GenerationRequest(  # noqa: E731
                f"ttft-{time.monotonic_ns()}", work.prompts[0], r,
                SamplingParams(max_tokens=2, temperature=0.0))
            cold.append(await ttft(engine, req()))
            warm.append(await ttft(engine, req()))
        for record in work.records[2:]:
            await engine.load_adapter(record)
        rss1 = rss_bytes()
        stats = engine.stats()
        cache = engine._cache
        unpadded = [cache.get(k).nbytes for k in cache.keys()]
        results["ttft"] = {
            "cold_s": sum(c for c, _ in cold) / len(cold),
            "cold_adapter_load_s": sum(s for _, s in cold) / len(cold),
            "warm_s": sum(w for w, _ in warm) / len(warm),
        }
        results["memory"] = {
            "unpadded_bytes_per_adapter": sum(unpadded) / len(unpadded),
            "stack_bytes_per_slot": stats["lora_stack_bytes"] / len(work.records),
            "rss_growth_per_adapter": (rss1 - rss0) / len(work.records),
        }
        await run_engine(engine, work.requests("mixed")[:4])  # warm-up
        runs: dict[str, list] = {"base": [], "one": [], "mixed": []}
        for _ in range(args.repeats):
            for mode in runs:
                runs[mode].append(await run_engine(engine, work.requests(mode)))
        results["engine"] = {mode: best(r) for mode, r in runs.items()}
        results["engine_stats"] = engine.stats()
        kernels = {}
        runner = engine._runner
        for kernel in ("masked", "sgmv", "grouped", "bmm", "auto"):
            runner.lora.kernel, runner._plan = kernel, None
            pairs: dict[str, list] = {"base": [], "mixed": []}
            for _ in range(max(1, args.repeats - 1)):  # each kernel against its own base runs
                for mode in pairs:
                    pairs[mode].append(await run_engine(engine, work.requests(mode)))
            kernels[kernel] = {mode: best(r) for mode, r in pairs.items()}
        results["kernels"] = kernels
        if work.heavy:  # the same, with rank-16 adapters on every linear layer
            for key in engine.health().resident_adapters:
                await engine.unload_adapter(key)
            for record in work.heavy:
                await engine.load_adapter(record)
            heavy: dict[str, list] = {"base": [], "mixed": []}
            for _ in range(args.repeats):
                for mode in heavy:
                    heavy[mode].append(await run_engine(engine, work.requests(mode, work.heavy)))
            results["all_linear"] = {mode: best(r) for mode, r in heavy.items()}
    finally:
        await engine.shutdown(drain_timeout_s=5)
    del engine


async def bench_nf4(args, base, work: Workload, results: dict) -> None:
    """nf4 and nf4-dense vs fp32 base, engines loaded together, runs interleaved."""
    from serve.engine import EngineConfig, GenerationRequest, SamplingParams, create_engine

    engines = {}
    for dtype in ("fp32", "nf4", "nf4-dense"):
        engines[dtype] = create_engine("peft", EngineConfig(
            base=base, base_dtype=dtype, max_running=len(work.prompts), max_model_len=1024))
        await engines[dtype].start()
    try:
        single = lambda: [GenerationRequest(  # noqa: E731
            f"single-{time.monotonic_ns()}", work.prompts[0], None,
            SamplingParams(max_tokens=work.max_tokens, temperature=0.0))]
        runs: dict[str, list] = {}
        for engine in engines.values():
            await run_engine(engine, work.requests("base")[:2])  # warm-up
        for _ in range(max(1, args.repeats - 1)):
            for dtype, engine in engines.items():
                runs.setdefault(f"{dtype}_base", []).append(
                    await run_engine(engine, work.requests("base")))
                runs.setdefault(f"{dtype}_single", []).append(await run_engine(engine, single()))
        for key, value in runs.items():
            results[key] = best(value)
    finally:
        for engine in engines.values():
            await engine.shutdown(drain_timeout_s=5)


def bench_peft(base_model, work: Workload, results: dict, mixed_batch: bool) -> None:
    """The naive server (set_adapter per request, serial) and PEFT's adapter_names batch."""
    import torch
    from peft import PeftModel

    names = [f"a{i}" for i in range(len(work.records))]
    model = PeftModel.from_pretrained(base_model, work.records[0].path, adapter_name=names[0])
    for name, record in zip(names[1:], work.records[1:], strict=True):
        model.load_adapter(str(record.path), adapter_name=name)
    model.eval()
    gen = dict(max_new_tokens=work.max_tokens, min_new_tokens=work.max_tokens, do_sample=False,
               pad_token_id=2)
    with torch.no_grad():
        wall, cpu, tokens = time.perf_counter(), time.process_time(), 0
        for i, prompt in enumerate(work.prompts):
            model.set_adapter(names[i % len(names)])
            ids = torch.tensor([prompt])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
            tokens += out.shape[1] - len(prompt)
        results["naive"] = {"tok_s": tokens / (time.perf_counter() - wall),
                            "tok_cpu_s": tokens / (time.process_time() - cpu)}
        if mixed_batch:
            width = max(len(p) for p in work.prompts)
            ids = torch.full((len(work.prompts), width), 2)
            mask = torch.zeros_like(ids)
            for i, prompt in enumerate(work.prompts):  # left padding
                ids[i, width - len(prompt):] = torch.tensor(prompt)
                mask[i, width - len(prompt):] = 1
            adapter_names = [names[i % len(names)] for i in range(len(work.prompts))]
            wall, cpu = time.perf_counter(), time.process_time()
            out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=adapter_names,
                                 **gen)
            tokens = (out.shape[1] - width) * len(work.prompts)
            results["peft_mixed_batch"] = {"tok_s": tokens / (time.perf_counter() - wall),
                                           "tok_cpu_s": tokens / (time.process_time() - cpu)}
    model.unload()


def report(results: dict, args) -> None:
    eng = results["engine"]

    def ratio(a: dict, b: dict) -> str:
        text = f"{a['tok_s'] / b['tok_s']:.2f} (cpu {a['tok_cpu_s'] / b['tok_cpu_s']:.2f}"
        if a.get("decode_tok_s") and b.get("decode_tok_s"):
            text += (f", decode {a['decode_tok_s'] / b['decode_tok_s']:.2f}, decode cpu "
                     f"{a['decode_tok_cpu_s'] / b['decode_tok_cpu_s']:.2f}")
        return text + ")"

    print(f"\n== peft engine, {len(QUESTIONS[:args.requests])} requests x {args.max_tokens} "
          f"tokens, adapters r={args.rank} on {args.targets} ==")
    print("ratios: end-to-end wall (cpu: per CPU-second; decode: decode passes only, wall and "
          "CPU)")
    for mode in ("base", "one", "mixed"):
        print(f"{mode:>6}: {eng[mode]['tok_s']:7.1f} tok/s  ({eng[mode]['tok_cpu_s']:6.1f} "
              f"tok/cpu-s, decode {eng[mode]['decode_tok_s']:6.1f} tok/s)")
    print(f"mixed / base (8 adapters):   {ratio(eng['mixed'], eng['base'])}")
    print(f"one / base:                  {ratio(eng['one'], eng['base'])}")
    for kernel, figures in results["kernels"].items():
        print(f"kernel {kernel:>7} mixed / base: {ratio(figures['mixed'], figures['base'])}")
    if "all_linear" in results:
        heavy = results["all_linear"]
        print(f"all-linear r={args.rank} adapters, mixed / base: "
              f"{ratio(heavy['mixed'], heavy['base'])}")
    if "naive" in results:
        print(f"naive set_adapter server:    {results['naive']['tok_s']:7.1f} tok/s; "
              f"engine mixed / naive = {ratio(eng['mixed'], results['naive'])}")
    if "peft_mixed_batch" in results:
        print(f"PEFT adapter_names batch:    {results['peft_mixed_batch']['tok_s']:7.1f} tok/s; "
              f"engine mixed / PEFT batch = {ratio(eng['mixed'], results['peft_mixed_batch'])}")
    t = results["ttft"]
    print(f"TTFT cold {t['cold_s']:.3f} s (adapter load {t['cold_adapter_load_s']:.3f} s), "
          f"warm {t['warm_s']:.3f} s, cold / warm = {t['cold_s'] / t['warm_s']:.1f}")
    m = results["memory"]
    print(f"memory per adapter: {m['unpadded_bytes_per_adapter'] / 2**20:.1f} MiB tensors, "
          f"{m['stack_bytes_per_slot'] / 2**20:.1f} MiB stacked slot, "
          f"{m['rss_growth_per_adapter'] / 2**20:.1f} MiB RSS growth")
    if "nf4_base" in results:
        print(f"nf4 / fp32 base, batched: {ratio(results['nf4_base'], results['fp32_base'])}; "
              f"single stream: {ratio(results['nf4_single'], results['fp32_single'])}")
        print("nf4-dense / fp32 base, batched: "
              f"{ratio(results['nf4-dense_base'], results['fp32_base'])}; single stream: "
              f"{ratio(results['nf4-dense_single'], results['fp32_single'])}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj",
                        help="comma-separated modules, or all-linear")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 requests x 12 tokens, one repeat")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens, args.repeats = 8, 12, 1

    import torch
    from transformers import AutoTokenizer

    from hub.store import Store
    from tests.factories import load_base_model, make_lora

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
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
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    records = [store.register(make_lora(base_model, home / f"src-{i}", seed=i, r=args.rank,
                                        alpha=2 * args.rank, targets=targets), f"bench-{i}")
               for i in range(8)]
    heavy = [] if args.quick or targets == "all-linear" else [
        store.register(make_lora(base_model, home / f"heavy-{i}", seed=100 + i, r=args.rank,
                                 alpha=2 * args.rank, targets="all-linear"), f"heavy-{i}")
        for i in range(8)]
    work = Workload(prompts, records, args.max_tokens, heavy)
    results: dict = {"args": vars(args) | {"json": str(args.json)}}
    asyncio.run(bench_engine(args, base, work, results))
    if not args.skip_naive:
        bench_peft(base_model, work, results, mixed_batch=True)
    del base_model
    asyncio.run(bench_nf4(args, base, work, results))
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
