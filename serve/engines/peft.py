"""The ``peft`` engine: one base loaded once, any number of LoRA adapters batched together.

Implements `serve.engine.Engine` on our own runtime (`serve.runtime`): a forward loop over the
transformers model's submodules with a slot KV cache, a batched multi-LoRA matmul over stacked
adapter weights (requests for different adapters share every decode pass), a continuous-batching
scheduler on a worker thread, and an LRU adapter cache with pinning. The name says where the
adapters come from (PEFT folders, PEFT's math, checked token for token against PEFT), not that
PEFT's modules run at serve time: PEFT's mixed-batch ``adapter_names`` runs each adapter's rows
separately in every layer and measured 25-55 % slower than the base here.

Engine options (``EngineConfig.options``; see `PeftOptions`): ``request_timeout_s``,
``prefill_chunk``, ``kv_initial_len``, ``verify_adapters``, ``compute_dtype``.

Errors: `generate` raises at call time (before any token) for invalid requests
(`hub.errors.InvalidInput`, `hub.errors.ContextLengthExceeded`, `hub.errors.Incompatible`,
`hub.errors.Unsupported`), a full queue (`hub.errors.Overloaded`) and draining
(`hub.errors.EngineUnavailable`); errors found later (adapter files changed: StoreCorrupt, a
request that waited past its deadline: Overloaded) are raised by the stream's ``__anext__``.

Where the job ends: token ids in, token ids out. Chat templates, tokenisation, stop strings and
HTTP are the server front's (`serve.chat`, `serve.http`).
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from hub.errors import EngineUnavailable, InvalidInput, Unsupported
from hub.machine import MeasurementCache, cache_root
from serve.engine import EngineConfig, EngineHealth, GenerationRequest
from serve.runtime.nf4_kernel import MAX_ROWS as NF4_MAX_ROWS
from serve.runtime.stats import EngineStats
from serve.runtime.stream import TokenSink, TokenStream

# Two busy cores: spin-waiting OpenMP threads made work 3-10x slower here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass
class PeftOptions:
    """Settings of the peft engine (``EngineConfig.options``).

    Attributes:
        request_timeout_s: Seconds from submission to the end of a request. A request still
            waiting then fails with Overloaded (429); a running one ends with
            ``finish_reason="abort"``.
        prefill_chunk: Prompt tokens per scheduler step, run in the same pass as the running
            sequences' decode rows; longer prompts continue over several steps, so running
            streams keep flowing.
        kv_initial_len: First KV cache length per row (doubled on demand up to max_model_len).
        verify_adapters: Re-hash adapter files against the store's checksums on each load.
        compute_dtype: ``auto`` (CPU: measured at start, see `serve.runtime.dtype_choice`;
            CUDA: bf16), or ``fp32``/``bf16`` to force it for ``nf4``/``nf4-dense``/``auto``
            weights (``--base-dtype fp32|bf16|fp16`` forces both weights and compute).
        lora_dtype: ``compute`` (LoRA weights and deltas in the compute dtype; the default),
            ``fp32``, or ``auto`` (CPU: the faster of the two in the start-time LoRA timing of
            `serve.runtime.dtype_choice`). Not ``auto`` by default: on an AVX512-BF16 machine
            that timing (one layer, in isolation) favoured fp32, while whole decode steps with
            one adapter at 16 rows ran faster with bf16 LoRA (bench/serve.py: one / base 0.48
            with fp32 pools).
        lora_kernel: How the mixed-batch LoRA delta is computed: ``torch`` (gathers and
            batched matmuls), ``native`` (one C call per projection, `serve.runtime.native`),
            or ``auto`` (the default: on CPU the faster of the two in the start-time timing of
            `serve.runtime.dtype_choice`, native only where its deltas agree with torch's).
        attention_kernel: Decode attention by ``sdpa`` (torch's), ``native`` (one C call per
            layer, `serve.runtime.native`) or ``auto`` (the default: measured at start on CPU,
            `serve.runtime.dtype_choice`).
        prefix_cache_mb: Memory for prompt-prefix keys and values reused across requests of the
            same adapter (`serve.runtime.prefix_cache`); 0 turns reuse off.
        prefix_block: Tokens per reusable prefix block.
        host_adapters: Evicted adapters kept in host memory, so reloading one is a copy rather
            than reading and converting its files (`serve.runtime.adapter_cache`); 0 turns it
            off. Default: as many as ``--max-adapters``.
        single_thread_rows: Passes of at most this many tokens run on one torch thread, the
            others on all (`serve.runtime.threads_choice`); 0: always all threads. Default
            (-1): measured at start on CPU (on a 2-core AVX512-BF16 machine one thread ran a
            batch-1 decode step in 15.5 ms, two threads in 24.2 ms).
        nf4_kernel_rows: An ``nf4-dense`` base on CPU runs passes of at most this many rows
            (up to 32) by its 4-bit codes (`serve.runtime.nf4_kernel`), 0: never. Default (-1):
            measured at start (on a 2-core AVX512-BF16 machine it took single-stream decoding
            from 29.1 to 39.9 tok/s).
    """

    request_timeout_s: float = 600.0
    prefill_chunk: int = 256
    kv_initial_len: int = 256
    verify_adapters: bool = True
    compute_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    lora_dtype: Literal["auto", "compute", "fp32"] = "compute"
    lora_kernel: Literal["auto", "native", "torch"] = "auto"
    attention_kernel: Literal["auto", "native", "sdpa"] = "auto"
    host_adapters: int = -1
    prefix_cache_mb: int = 64
    prefix_block: int = 8
    single_thread_rows: int = -1
    nf4_kernel_rows: int = -1

    @classmethod
    def parse(cls, options: dict[str, Any]) -> PeftOptions:
        """Build from ``EngineConfig.options``, reporting every problem at once.

        Raises:
            InvalidInput: Unknown keys or bad values.
        """
        known = {f.name for f in fields(cls)}
        problems = [f"unknown option {key!r}" for key in options if key not in known]
        values = {k: v for k, v in options.items() if k in known}
        opts = cls(**values)
        if not isinstance(opts.request_timeout_s, int | float) or opts.request_timeout_s <= 0:
            problems.append(f"request_timeout_s must be > 0, got {opts.request_timeout_s!r}")
        if not isinstance(opts.prefill_chunk, int) or opts.prefill_chunk < 16:
            problems.append(f"prefill_chunk must be an int >= 16, got {opts.prefill_chunk!r}")
        if not isinstance(opts.kv_initial_len, int) or opts.kv_initial_len < 16:
            problems.append(f"kv_initial_len must be an int >= 16, got {opts.kv_initial_len!r}")
        hints = get_type_hints(cls)
        for f in fields(cls):  # every Literal option: one rule, its choices from the type
            choices = get_args(hints[f.name]) if get_origin(hints[f.name]) is Literal else ()
            value = getattr(opts, f.name)
            if choices and value not in choices:
                problems.append(f"{f.name} must be {', '.join(choices[:-1])} or {choices[-1]}, "
                                f"got {value!r}")
        if not isinstance(opts.prefix_cache_mb, int) or opts.prefix_cache_mb < 0:
            problems.append(f"prefix_cache_mb must be an int >= 0, got {opts.prefix_cache_mb!r}")
        if not isinstance(opts.prefix_block, int) or opts.prefix_block < 1:
            problems.append(f"prefix_block must be an int >= 1, got {opts.prefix_block!r}")
        if not isinstance(opts.host_adapters, int) or opts.host_adapters < -1:
            problems.append(f"host_adapters must be an int >= 0, got {opts.host_adapters!r}")
        if not isinstance(opts.single_thread_rows, int) or opts.single_thread_rows < -1:
            problems.append(f"single_thread_rows must be an int >= 0 (or -1: measure), got "
                            f"{opts.single_thread_rows!r}")
        if (not isinstance(opts.nf4_kernel_rows, int)
                or not -1 <= opts.nf4_kernel_rows <= NF4_MAX_ROWS):
            problems.append(f"nf4_kernel_rows must be an int from 0 to {NF4_MAX_ROWS} (or -1: "
                            f"measure), got {opts.nf4_kernel_rows!r}")
        if problems:
            raise InvalidInput("Bad peft engine options: " + "; ".join(problems),
                               fix=f"Known options: {', '.join(sorted(known))}.",
                               param="options")
        return opts


# The rank whose LoRA pool is allocated and whose kernels run once at start (the default recipe's).
WARM_RANK = 16


def warm_up(runner, rank: int) -> None:
    """Run the LoRA paths once with zero adapters of ``rank``, then clear them.

    The first real adapter after start then finds its pool allocated and every kernel it uses
    initialised: without this, it added about 90 ms more to its time to first token than later
    cold adapters did.
    """
    import torch

    from serve.runtime.lora import AdapterWeights
    from serve.runtime.runner import DecodeRows

    modules = {}
    for layer in range(runner.num_layers):
        for name, (in_f, sizes) in runner.shapes.items():
            modules[(layer, name)] = (torch.zeros(len(sizes) * rank, in_f),
                                      [torch.zeros(rank, size) for size in sizes])
    weights = AdapterWeights(modules, rank)
    slots = [runner.lora.install(weights) for _ in range(min(2, runner.lora.capacity))]
    cache = runner.cache
    rows = [cache.allocate() for _ in range(min(3, cache.rows))]
    plan = (slots + [-1] * len(rows))[:len(rows)]
    try:
        with torch.inference_mode():
            runner.forward(None, [(row, [0, 1, 2], 0, slot) for row, slot in zip(rows, plan,
                                                                               strict=True)])
            runner.forward(DecodeRows([3] * len(rows), [3] * len(rows), plan), [])
            runner.forward(DecodeRows([3] * len(rows), [4] * len(rows), [slots[0]] * len(rows)),
                           [])
    finally:
        for slot in slots:
            runner.lora.clear(slot)
        cache.shrink(0)


def default_threads() -> int:
    """CPU threads for torch: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _check_config(config: EngineConfig) -> None:
    problems = []
    for name in ("max_adapters", "max_running", "max_queue", "max_model_len", "max_lora_rank"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(config.threads, int) or config.threads < 0:
        problems.append(f"threads must be an int >= 0, got {config.threads!r}")
    if problems:
        raise InvalidInput("Bad engine config: " + "; ".join(problems),
                           fix="Correct the serve options.", param="config")


class PeftEngine:
    """Multi-LoRA engine on transformers weights and our own batched runtime."""

    name = "peft"

    def __init__(self, config: EngineConfig) -> None:
        """Check the config; nothing heavy happens until `start`.

        Raises:
            InvalidInput: Bad config values or options.
        """
        _check_config(config)
        self.config = config
        self.options = PeftOptions.parse(dict(config.options))
        self.stats_ = EngineStats()
        self._status: Literal["starting", "ok", "draining", "failed"] = "starting"
        self._detail = ""
        self._runner = None
        self._cache = None
        self._scheduler = None
        self._threads = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the base model (in a thread) and start the scheduler."""
        try:
            await asyncio.to_thread(self._start_sync)
        except BaseException as exc:
            self._status = "failed"
            self._detail = f"start failed: {type(exc).__name__}: {exc}"
            raise
        self._status = "ok"

    def _start_sync(self) -> None:
        import torch

        from serve.runtime import native, threads_choice
        from serve.runtime.adapter_cache import AdapterCache
        from serve.runtime.adapter_files import read_adapter, warm_reader
        from serve.runtime.base import load_base
        from serve.runtime.prefix_cache import PrefixCache
        from serve.runtime.runner import ModelRunner
        from serve.runtime.scheduler import Scheduler

        cfg, opts = self.config, self.options
        self._threads = cfg.threads or default_threads()
        torch.set_num_threads(self._threads)
        base = load_base(cfg.base, cfg.base_dtype, cfg.device, cfg.max_model_len,
                         compute=opts.compute_dtype)
        choice = base.dtype_choice
        lora = opts.lora_dtype
        if lora == "auto":  # measured with the compute dtype (serve.runtime.dtype_choice)
            lora = choice.lora if choice is not None else "compute"
        lora_dtype = {"compute": None, "fp32": torch.float32}[lora]
        kernel = opts.lora_kernel
        if kernel == "auto":  # measured on CPU (serve.runtime.dtype_choice)
            kernel = choice.lora_kernel if choice is not None else "torch"
        attention = opts.attention_kernel
        if attention == "auto":
            attention = choice.attention if choice is not None else "sdpa"
        # What identifies the weights and their dense path: part of every start-up
        # measurement's cache key (the nf4 rows here, the thread plan below).
        weights_id = [str(Path(cfg.base.path).resolve()), base.dtype_name,
                      str(base.compute_dtype), choice.kernel if choice else ""]
        runner = ModelRunner(base, max_running=cfg.max_running, max_adapters=cfg.max_adapters,
                             kv_initial_len=opts.kv_initial_len, lora_dtype=lora_dtype,
                             lora_kernel=kernel, attention_kernel=attention,
                             nf4_kernel_rows=opts.nf4_kernel_rows,
                             model_id=weights_id,
                             measurements=MeasurementCache(cache_root() / "nf4-rows"))
        missing = [name for name, asked, got in (
            ("lora_kernel", opts.lora_kernel, runner.lora.kernel),
            ("attention_kernel", opts.attention_kernel,
             "native" if runner.attention is not None else "sdpa"))
            if asked == "native" and got != "native"]
        if missing:
            raise Unsupported(f"{', '.join(missing)}=native was asked for, but the native "
                              f"kernels are not available here (CPU only, float32 or bfloat16, "
                              f"and a C compiler or $LORADOCK_NATIVE_PREBUILT)",
                              fix="Install gcc (or set CC, or point LORADOCK_NATIVE_PREBUILT "
                                  "at `python -m serve.runtime.native --prebuild DIR`), "
                                  "or use auto.")
        step_lock = threading.Lock()
        leaves = runner.spec.lora_leaves

        def reader(record):
            return read_adapter(record, runner.weights, leaves, max_rank=cfg.max_lora_rank,
                                dtype=runner.lora.dtype, verify=opts.verify_adapters)

        warm_rank = min(WARM_RANK, cfg.max_lora_rank)
        host = cfg.max_adapters if opts.host_adapters < 0 else opts.host_adapters
        cache = AdapterCache(runner.lora, cfg.max_adapters, reader, step_lock,
                             host_capacity=host)
        scheduler = Scheduler(
            runner, cache, step_lock, max_running=cfg.max_running, max_queue=cfg.max_queue,
            prefill_chunk=opts.prefill_chunk, request_timeout_s=float(opts.request_timeout_s),
            stats=self.stats_,
            prefix=PrefixCache(runner.cache, opts.prefix_cache_mb << 20, opts.prefix_block),
        )
        cache.on_loaded = scheduler.wake.set
        cache.warm(lambda: warm_reader(runner.weights, leaves, warm_rank, runner.lora.dtype))

        def prologue() -> None:  # on the scheduler's thread, before it serves
            # The plan first (a measurement times best-of-several steps, so it needs no warm-up
            # of its own), then one warm-up with the plan's thread counts.
            runner.thread_plan = threads_choice.choose(
                runner, self._threads,
                [*weights_id, str(runner.lora.dtype), runner.lora.kernel,
                 runner.attention is not None, native.identity()],
                None if opts.single_thread_rows < 0 else opts.single_thread_rows,
                MeasurementCache(cache_root() / "thread-plan"))
            warm_up(runner, warm_rank)

        try:
            scheduler.start(prologue)
        except BaseException:
            cache.close()  # its loader thread was started above
            raise
        self._runner, self._cache, self._scheduler = runner, cache, scheduler
        # What start-up left (the transformers model's remains, tokenizer, measurements) is
        # never freed while serving: move it out of the collector's view, so later full
        # collections, triggered by an adapter load's allocations, do not walk it all.
        gc.collect()
        gc.freeze()
        self._detail = (f"family={runner.spec.model_type} weights={base.dtype_name} "
                        f"compute={choice.dtype if choice else runner.dtype} "
                        f"({choice.reason if choice else ''}) device={base.device} "
                        f"threads={self._threads} ({runner.thread_plan.reason}) "
                        f"{runner.nf4_reason + ' ' if runner.nf4_reason else ''}"
                        f"max_len={base.max_len} "
                        f"load_s={base.load_s:.1f}")

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting, let running and queued requests finish (up to the timeout), stop."""
        scheduler = self._scheduler
        if scheduler is None:
            self._status = "failed" if self._status == "failed" else "draining"
            return
        self._status = "draining"
        with scheduler.lock:
            scheduler.accepting = False
        deadline = time.monotonic() + max(0.0, drain_timeout_s)
        while time.monotonic() < deadline and any(scheduler.counts()):
            await asyncio.sleep(0.05)
        await asyncio.to_thread(scheduler.stop)
        if self._cache is not None:
            self._cache.close()
        self._scheduler = self._runner = self._cache = None
        self._detail = "stopped"

    # -- adapters ---------------------------------------------------------------------------

    def _require_running(self) -> None:
        if self._scheduler is None or self._status != "ok":
            raise EngineUnavailable(f"The peft engine is {self._status}",
                                    fix="Wait for it to start, or restart the server.")

    async def load_adapter(self, adapter) -> float:
        """Make ``adapter`` resident now; seconds it took (0.0 if it already was).

        Raises:
            Unsupported / Incompatible: The engine cannot serve it.
            Conflict: Every slot holds an adapter with requests in flight.
            StoreCorrupt: Its files changed since registration.
        """
        from serve.engine import adapter_key
        from serve.runtime.adapter_files import check_capabilities

        self._require_running()
        if adapter.base != self.config.base.name:
            from hub.errors import Incompatible

            raise Incompatible(f"Adapter {adapter_key(adapter)} belongs to base {adapter.base!r}",
                               fix=f"Load it on a server for base {adapter.base!r}.",
                               param="name")
        check_capabilities(adapter, self.config.max_lora_rank)
        if self._cache.get(adapter_key(adapter)) is not None:
            return 0.0
        entry = await asyncio.wrap_future(self._cache.start_load(adapter))
        return entry.load_s

    async def unload_adapter(self, key: str) -> bool:
        """Evict ``NAME@V``; False if it was not resident.

        Raises:
            Conflict: Requests using it are in flight.
        """
        self._require_running()
        return await asyncio.to_thread(self._cache.unload, key)

    # -- generation -------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> TokenStream:
        """Queue ``request`` and return its token stream (see the module docstring for errors).

        The stop token that ends a sequence is not included in ``token_ids``.
        """
        from serve.runtime.requests import validate_request

        self._require_running()
        runner = self._runner
        validate_request(request, base_name=self.config.base.name,
                         vocab_size=runner.vocab_size, max_len=runner.max_len,
                         max_rank=self.config.max_lora_rank)
        sink = TokenSink(asyncio.get_running_loop())
        self._scheduler.submit(request, sink)
        return TokenStream(sink, request.request_id, self._scheduler.abort)

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its slot (no-op if unknown or finished)."""
        if self._scheduler is not None:
            self._scheduler.abort(request_id)

    # -- observation ------------------------------------------------------------------------

    def health(self) -> EngineHealth:
        """Status, resident adapters and queue sizes (cheap)."""
        running, waiting = self._scheduler.counts() if self._scheduler else (0, 0)
        detail = self._detail
        if self._scheduler is not None and self._scheduler.error:
            detail += f" last_error={self._scheduler.error}"
        return EngineHealth(
            status=self._status,
            engine=self.name,
            base=self.config.base.name,
            resident_adapters=self._cache.keys() if self._cache else [],
            running=running,
            waiting=waiting,
            detail=detail,
        )

    def metrics_lines(self) -> list[str]:
        """`stats` for ``/metrics``: one gauge ``loradock_peft_<name>`` per counter."""
        out = []
        for name, value in sorted(self.stats().items()):
            metric = f"loradock_peft_{name}"
            out += [f"# TYPE {metric} gauge", f"{metric} {float(value)!r}"]
        return out

    def stats(self) -> dict[str, float]:
        """Counters for ``/metrics`` and benchmarks (see `serve.runtime.stats.EngineStats`)."""
        data = self.stats_.snapshot()
        cache = self._cache
        if cache is not None:
            data.update(adapter_loads=cache.loads, adapter_evictions=cache.evictions,
                        adapter_host_hits=cache.host_hits,
                        adapter_load_s_total=cache.load_s_total,
                        adapters_resident=len(cache.keys()),
                        lora_stack_bytes=cache.stack.nbytes())
        if self._runner is not None:
            data["kv_cache_bytes"] = self._runner.cache.nbytes()
            # Which kernels run (serve.runtime.native): 1 native, 0 torch's ops.
            data["native_lora_kernel"] = float(self._runner.lora.kernel == "native")
            data["native_attention_kernel"] = float(self._runner.attention is not None)
        prefix = self._scheduler.prefix if self._scheduler is not None else None
        if prefix is not None:
            data.update(prefix_hit_tokens=prefix.hit_tokens, prefix_cache_bytes=prefix.nbytes)
        return data
