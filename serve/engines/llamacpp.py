"""The ``llamacpp`` engine: a GGUF base in llama.cpp, hub adapters as GGUF LoRAs switched on it.

The base is loaded once from a GGUF file: any GGUF given with ``--engine-option gguf=PATH``
(e.g. one written by ``loradock export gguf``), else the embedded Q4_1 SmolLM2 for the
``smollm2`` base, else the base's own GGUF built once by export (`export.pipeline.base_gguf`:
llama.cpp's ``convert_hf_to_gguf.py`` for the families `export.llama_convert.uses_converter`
names, loradock's writer for Llama; ``base_quant`` f16 or q8_0) into the cache folder
(``gguf/NAME-FINGERPRINT.QUANT.gguf``, reused while the base is unchanged).
Each adapter is converted once per ``NAME@V`` into a GGUF LoRA (export's converters: llama.cpp's
``convert_lora_to_gguf.py`` where `uses_converter` says so, else
`export.lora_gguf.write_lora_gguf`) and cached under the store's cache folder
(``lora-gguf/NAME/vV-DIGEST.gguf``); up to ``max_adapters`` are kept loaded on the model at
once (``llama_adapter_lora_init``) and switched per request on the same context
(``llama_set_adapters_lora``) without reloading the base.

One sequence at a time: llama.cpp cannot put requests for different adapters in one batch (the
adapter set belongs to the context), so this engine runs requests one after another, in arrival
order, on a single worker thread; ``max_running`` has no effect and ``max_queue`` bounds the
waiting line. Every request starts from an empty KV cache: llama-cpp-python would otherwise reuse
the previous request's cache for a shared prompt prefix, which is wrong after an adapter switch
(the cache was computed with the other adapter) and, even for the same adapter, changes greedy
outputs (evaluating a prompt in one batch or in pieces rounds differently on the quantised base;
seen here: a token flipped). Outputs therefore depend only on the request.

Options (``EngineConfig.options``; ``--engine-option KEY=VALUE``; see `LlamaCppOptions`):
``gguf``, ``cache_dir``, ``lora_dtype``, ``base_quant``, ``n_batch``.

Where the job ends: token ids in, token ids out. Chat templates, tokenisation, stop strings and
HTTP are the server front's; writing GGUF files is export's.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
import os
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from hub.bases import EMBEDDED_BASE, EMBEDDED_HF_ID, embedded_gguf_path
from hub.errors import (
    Conflict,
    EngineUnavailable,
    Incompatible,
    InvalidInput,
    Overloaded,
    StoreCorrupt,
    Unsupported,
)
from hub.files import atomic_file, sha256_file
from hub.names import validate_name
from hub.store import AdapterRecord
from serve.engine import (
    EngineConfig,
    EngineHealth,
    GenerationRequest,
    TokenChunk,
    adapter_key,
    cpu_count,
)
from serve.runtime.stream import TokenSink, TokenStream

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass
class LlamaCppOptions:
    """Settings of the llamacpp engine (``EngineConfig.options``).

    Attributes:
        gguf: Base model GGUF file. Default: the embedded Q4_1 SmolLM2 for base ``smollm2``;
            for any other base, its GGUF converted once into ``cache_dir``.
        cache_dir: Where converted GGUF LoRAs and base GGUFs (and llama.cpp's converter) are
            kept. Default: ``$LORADOCK_CACHE``, else the adapter store's ``cache`` folder for
            LoRAs and the default store's (``~/.loradock/cache``) for bases.
        lora_dtype: Storage type of converted LoRA tensors (``f32`` or ``f16``).
        base_quant: Weight type of a base GGUF converted here (``f16`` or ``q8_0``).
        n_batch: Prompt tokens evaluated per llama.cpp decode call.
    """

    gguf: str = ""
    cache_dir: str = ""
    lora_dtype: Literal["f32", "f16"] = "f32"
    base_quant: Literal["f16", "q8_0"] = "f16"
    n_batch: int = 512

    @classmethod
    def parse(cls, options: dict[str, Any]) -> LlamaCppOptions:
        """Build from ``EngineConfig.options`` (CLI values arrive as strings).

        Raises:
            InvalidInput: Unknown keys or bad values, all reported together.
        """
        known = {f.name for f in fields(cls)}
        problems = [f"unknown option {key!r}" for key in options if key not in known]
        opts = cls(**{k: v for k, v in options.items() if k in known})
        opts.gguf, opts.cache_dir = str(opts.gguf or ""), str(opts.cache_dir or "")
        if opts.lora_dtype not in ("f32", "f16"):
            problems.append(f"lora_dtype must be f32 or f16, got {opts.lora_dtype!r}")
        if opts.base_quant not in ("f16", "q8_0"):
            problems.append(f"base_quant must be f16 or q8_0, got {opts.base_quant!r}")
        try:
            opts.n_batch = int(opts.n_batch)
            if opts.n_batch < 1:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"n_batch must be an int >= 1, got {opts.n_batch!r}")
        if opts.gguf and not Path(opts.gguf).expanduser().is_file():
            problems.append(f"gguf={opts.gguf!r} is not a file")
        if problems:
            raise InvalidInput("Bad llamacpp engine options: " + "; ".join(problems),
                               fix=f"Known options: {', '.join(sorted(known))}.",
                               param="engine_option")
        return opts


@dataclass
class _Job:
    request: GenerationRequest
    sink: TokenSink
    key: str | None


class LlamaCppEngine:
    """llama.cpp engine; requests run one at a time (see the module docstring)."""

    name = "llamacpp"

    def __init__(self, config: EngineConfig) -> None:
        """Check the config and options; nothing is loaded until `start`.

        Raises:
            InvalidInput: Bad options or a base dtype other than ``auto``.
        """
        self.config = config
        self.options = LlamaCppOptions.parse(dict(config.options))
        if config.base_dtype != "auto":
            raise InvalidInput(
                f"--base-dtype {config.base_dtype} does not apply to the llamacpp engine: it "
                "serves the GGUF file's own weight types",
                fix="Pass --base-dtype auto, or give another GGUF with --engine-option gguf=PATH.",
                param="base_dtype",
            )
        self._status: Literal["starting", "ok", "draining", "failed"] = "starting"
        self._detail = ""
        self._llm: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # guards the counters and sets below
        self._resident: OrderedDict[str, Any] = OrderedDict()  # NAME@V -> adapter pointer
        self._in_flight: dict[str, int] = {}  # NAME@V -> queued or running requests
        self._aborted: set[str] = set()
        self._requests: set[str] = set()  # queued or running request ids
        self._active: str | None = None  # adapter set on the context (None: bare base)
        self._running = 0
        self._waiting = 0
        self._n_ctx = 0
        self._n_vocab = 0

    # -- lifecycle --------------------------------------------------------------------------

    def _cache_root(self, adapter: AdapterRecord | None = None) -> Path:
        """``cache_dir``, ``$LORADOCK_CACHE``, else the adapter's store cache (or the default)."""
        root = self.options.cache_dir or os.environ.get("LORADOCK_CACHE") or ""
        if root:
            return Path(root).expanduser()
        if adapter is not None:
            return Path(adapter.path).parents[2] / "cache"
        from hub.store import default_home

        return default_home() / "cache"

    def _gguf_path(self) -> Path:
        """The base GGUF: the option, the embedded one, or one converted once (worker thread)."""
        if self.options.gguf:
            return Path(self.options.gguf).expanduser()
        base = self.config.base
        if base.name == EMBEDDED_BASE and base.hf_id in ("", EMBEDDED_HF_ID):
            return embedded_gguf_path()
        from types import SimpleNamespace

        from export.pipeline import base_gguf

        cache = self._cache_root()
        try:
            # base_gguf reads only the store's cache folder.
            return base_gguf(SimpleNamespace(cache=cache), base,  # type: ignore[arg-type]
                             self.options.base_quant)
        except Unsupported as exc:
            raise Unsupported(
                f"The llamacpp engine could not build a GGUF of base {base.name!r}: {exc.message}",
                fix=f"{exc.fix} Or export one with `loradock export gguf` and pass "
                "--engine-option gguf=PATH.",
                param="engine_option",
            ) from exc

    async def start(self) -> None:
        """Load the GGUF base on the worker thread."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        try:
            await asyncio.wrap_future(self._executor.submit(self._load_base))
        except BaseException as exc:
            self._status = "failed"
            self._detail = f"start failed: {type(exc).__name__}: {exc}"
            raise
        self._status = "ok"

    def _load_base(self) -> None:
        import llama_cpp

        cfg = self.config
        path = self._gguf_path()
        if cfg.device == "cuda" and not llama_cpp.llama_supports_gpu_offload():
            raise Unsupported("This llama-cpp-python build has no GPU support",
                              fix="Use --device cpu, or install a CUDA build of llama-cpp-python.",
                              param="device")
        threads = cfg.threads or cpu_count()
        started = time.perf_counter()
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=cfg.max_model_len,
            n_batch=min(self.options.n_batch, cfg.max_model_len),
            n_ubatch=min(self.options.n_batch, cfg.max_model_len),
            n_threads=threads, n_threads_batch=threads,
            n_gpu_layers=0 if cfg.device == "cpu" else -1, verbose=False,
        )
        if cfg.base.vocab_size and llm.n_vocab() != cfg.base.vocab_size:
            llm.close()
            raise Incompatible(
                f"GGUF {path.name} has a vocabulary of {llm.n_vocab()} tokens; base "
                f"{cfg.base.name!r} has {cfg.base.vocab_size}",
                fix="Pass the GGUF exported from this base (--engine-option gguf=PATH).",
                param="engine_option",
            )
        self._llm, self._n_ctx, self._n_vocab = llm, llm.n_ctx(), llm.n_vocab()
        self._detail = (f"gguf={path.name} threads={threads} n_ctx={self._n_ctx} "
                        f"load_s={time.perf_counter() - started:.1f} serial=1")

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let queued ones finish up to the timeout, abort the rest, free."""
        if self._status == "ok":
            self._status = "draining"
        deadline = time.monotonic() + max(0.0, drain_timeout_s)
        while time.monotonic() < deadline and (self._running or self._waiting):
            await asyncio.sleep(0.05)
        with self._lock:
            self._aborted.add("*")
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.wrap_future(executor.submit(self._free))
            executor.shutdown(wait=True)
        self._detail = "stopped"

    def _free(self) -> None:
        import llama_cpp

        with self._lock:
            pointers, self._resident = list(self._resident.values()), OrderedDict()
        for pointer in pointers:
            llama_cpp.llama_adapter_lora_free(pointer)
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    # -- adapters ---------------------------------------------------------------------------

    def _require_running(self) -> ThreadPoolExecutor:
        if self._status != "ok" or self._executor is None:
            raise EngineUnavailable(f"The llamacpp engine is {self._status}",
                                    fix="Wait for it to start, or restart the server.")
        return self._executor

    def _check_adapter(self, adapter: AdapterRecord) -> None:
        if adapter.base != self.config.base.name:
            raise Incompatible(
                f"Adapter {adapter_key(adapter)} belongs to base {adapter.base!r}; this engine "
                f"serves {self.config.base.name!r}",
                fix=f"Call it on a server for base {adapter.base!r}.", param="model")
        problems = adapter.capabilities.engine_problems("llamacpp", self.config.max_lora_rank)
        if problems:
            raise Unsupported(
                f"The llamacpp engine cannot serve adapter {adapter_key(adapter)}: "
                + "; ".join(problems),
                fix="Serve it with --engine peft, or export a merged GGUF "
                "(`loradock export gguf`); raise --max-lora-rank if only the rank is too high.",
                param="model")

    async def load_adapter(self, adapter: AdapterRecord) -> float:
        """Convert (once) and load ``adapter``; seconds it took (0.0 if already loaded).

        Raises:
            Unsupported / Incompatible: The engine cannot serve it.
            StoreCorrupt: Its files changed since registration.
        """
        executor = self._require_running()
        self._check_adapter(adapter)
        with self._lock:
            if adapter_key(adapter) in self._resident:
                return 0.0
        return await asyncio.wrap_future(executor.submit(self._ensure_loaded, adapter))

    async def unload_adapter(self, key: str) -> bool:
        """Free adapter ``NAME@V``; False if it was not loaded.

        Raises:
            Conflict: Requests using it are queued or running.
        """
        executor = self._require_running()
        with self._lock:
            if self._in_flight.get(key):
                raise Conflict(f"Adapter {key} has {self._in_flight[key]} requests in flight",
                               fix="Retry when they finish.")
        return await asyncio.wrap_future(executor.submit(self._evict, key))

    def lora_path(self, adapter: AdapterRecord) -> Path:
        """Where the converted GGUF LoRA of ``adapter`` is cached."""
        validate_name(adapter.name)
        cache = self._cache_root(adapter)
        dtype = self.options.lora_dtype
        return (cache / "lora-gguf" / adapter.name
                / f"v{adapter.version}-{adapter.digest[:16]}-{dtype}.gguf")

    def _convert(self, adapter: AdapterRecord) -> Path:
        """Write the GGUF LoRA once per content (worker thread)."""
        out = self.lora_path(adapter)
        if out.is_file():
            return out
        bad = [rel for rel, digest in adapter.files.items()
               if not (adapter.path / rel).is_file() or sha256_file(adapter.path / rel) != digest]
        if bad:
            raise StoreCorrupt(
                f"Adapter {adapter_key(adapter)} has changed on disk: {', '.join(bad)}",
                fix=f"Remove it (`loradock hub rm {adapter_key(adapter)}`) and register it again.")
        from export.llama_convert import convert_lora, uses_converter
        from export.lora_gguf import read_base_config, write_lora_gguf

        base_dir = Path(self.config.base.path)
        config = read_base_config(base_dir)
        with atomic_file(out) as tmp:
            if uses_converter(config):
                convert_lora(adapter.path, base_dir, tmp, cache=self._cache_root(adapter),
                             dtype=self.options.lora_dtype)
            else:
                write_lora_gguf(adapter.path, config, tmp, dtype=self.options.lora_dtype,
                                name=adapter_key(adapter))
        return out

    def _ensure_loaded(self, adapter: AdapterRecord) -> float:
        """Make ``adapter`` resident (worker thread); seconds spent, 0.0 if it was."""
        import llama_cpp

        key = adapter_key(adapter)
        with self._lock:
            if key in self._resident:
                self._resident.move_to_end(key)
                return 0.0
        started = time.perf_counter()
        path = self._convert(adapter)
        while len(self._resident) >= self.config.max_adapters:
            # Requests run one at a time, so no resident adapter is in use now; queued requests
            # for the evicted one load it again.
            self._evict(next(iter(self._resident)))
        pointer = llama_cpp.llama_adapter_lora_init(self._llm.model, str(path).encode())
        if not pointer:
            raise Unsupported(f"llama.cpp refused the converted LoRA of {key} ({path.name})",
                              fix="Serve it with --engine peft and report the adapter.",
                              param="model")
        with self._lock:
            self._resident[key] = pointer
        return time.perf_counter() - started

    def _evict(self, key: str) -> bool:
        import llama_cpp

        with self._lock:
            pointer = self._resident.pop(key, None)
        if pointer is None:
            return False
        if self._active == key:
            self._activate(None)
        llama_cpp.llama_adapter_lora_free(pointer)
        return True

    def _activate(self, key: str | None) -> None:
        """Set the context's adapter to ``key`` (None: bare base); clear the KV on a change."""
        import llama_cpp

        if key == self._active:
            return
        ctx = self._llm.ctx
        if key is None:
            status = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            with self._lock:
                pointer = self._resident[key]
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(pointer)
            scales = (ctypes.c_float * 1)(1.0)
            status = llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales)
        if status != 0:
            raise EngineUnavailable(f"llama.cpp could not switch to adapter {key}",
                                    fix="Restart the server.")
        # The cached tokens were computed with the previous adapter: forget them.
        self._llm.reset()
        memory = llama_cpp.llama_get_memory(ctx)
        if memory is not None:
            llama_cpp.llama_memory_clear(memory, True)
        self._active = key

    # -- generation -------------------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> None:
        from hub.errors import ContextLengthExceeded
        from serve.runtime.sampling import check_params

        ids = request.prompt_ids
        if not isinstance(ids, list) or not ids:
            raise InvalidInput("The prompt is empty", fix="Send at least one token.",
                               param="prompt")
        if len(ids) >= self._n_ctx:
            raise ContextLengthExceeded(
                f"The prompt has {len(ids)} tokens; this engine's context is {self._n_ctx} "
                "tokens and at least one must be left for the completion",
                fix="Shorten the prompt or raise --max-model-len.", param="messages")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self._n_vocab]
        if bad:
            raise InvalidInput(f"Prompt token ids {bad[:5]} are outside the vocabulary "
                               f"(0..{self._n_vocab - 1})", param="prompt")
        check_params(request.params, self._n_vocab)
        if request.adapter is not None:
            self._check_adapter(request.adapter)

    def generate(self, request: GenerationRequest) -> TokenStream:
        """Queue ``request`` behind the others and return its token stream.

        The stop token that ends a sequence is not included in ``token_ids``.

        Raises:
            EngineUnavailable: Not started, draining or failed.
            InvalidInput / Incompatible / Unsupported: A request the engine cannot run.
            Overloaded: ``max_queue`` requests are already waiting.
        """
        executor = self._require_running()
        self._validate(request)
        key = adapter_key(request.adapter) if request.adapter else None
        with self._lock:
            if self._waiting >= self.config.max_queue:
                raise Overloaded(f"{self._waiting} requests are already waiting",
                                 fix="Retry later.", retry_after_s=1.0)
            self._waiting += 1
            if key:
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
            self._requests.add(request.request_id)
        sink = TokenSink(asyncio.get_running_loop())
        job = _Job(request, sink, key)
        future: Future = executor.submit(self._run, job)
        future.add_done_callback(lambda f: self._finished(job, f))
        return TokenStream(sink, request.request_id, self._abort_now)

    def _finished(self, job: _Job, future: Future) -> None:
        with self._lock:
            if job.key:
                self._in_flight[job.key] -= 1
                if not self._in_flight[job.key]:
                    del self._in_flight[job.key]
            self._aborted.discard(job.request.request_id)
            self._requests.discard(job.request.request_id)
        if future.cancelled():
            job.sink.push(TokenChunk([], finish_reason="abort"))
            job.sink.close()

    def _is_aborted(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._aborted or "*" in self._aborted

    def _run(self, job: _Job) -> None:
        with self._lock:
            self._waiting -= 1
            self._running += 1
        try:
            request = job.request
            if self._is_aborted(request.request_id):
                job.sink.push(TokenChunk([], finish_reason="abort",
                                         prompt_tokens=len(request.prompt_ids)))
                return
            load_s = self._ensure_loaded(request.adapter) if request.adapter else 0.0
            self._activate(job.key)
            self._llm.reset()  # no prompt-prefix reuse (see the module docstring)
            self._decode(job, load_s)
        except Exception as exc:  # surfaces in the consumer's __anext__
            job.sink.fail(exc)
        finally:
            job.sink.close()
            with self._lock:
                self._running -= 1

    def _decode(self, job: _Job, load_s: float) -> None:
        request, params, llm = job.request, job.request.params, self._llm
        limit = min(params.max_tokens, self._n_ctx - len(request.prompt_ids))
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**32)
        llm.set_seed(int(seed) % 0xFFFFFFFF)
        stop_ids = set(params.stop_token_ids)
        want_logprobs = params.logprobs or params.top_logprobs > 0
        tokens = llm.generate(request.prompt_ids, reset=True, **_sampling_args(params))
        first = True
        try:
            for count, token in enumerate(tokens, 1):
                chunk = TokenChunk([] if token in stop_ids else [int(token)])
                if first:
                    chunk.prompt_tokens, chunk.adapter_load_s, first = (
                        len(request.prompt_ids), load_s, False)
                if self._is_aborted(request.request_id):
                    chunk.token_ids, chunk.finish_reason = [], "abort"
                elif token in stop_ids:
                    chunk.finish_reason = "stop"
                elif count >= limit:
                    chunk.finish_reason = "length"
                if chunk.token_ids and want_logprobs:
                    self._add_logprobs(chunk, int(token), params.top_logprobs)
                if not job.sink.push(chunk) or chunk.finish_reason:
                    return
        finally:
            tokens.close()

    def _add_logprobs(self, chunk: TokenChunk, token: int, top: int) -> None:
        """Log-softmax of the raw logits that produced ``token`` (before temperature)."""
        import llama_cpp
        import numpy as np

        pointer = llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).astype(np.float64)
        peak = float(logits.max())
        logprobs = logits - (peak + math.log(float(np.exp(logits - peak).sum())))
        chunk.logprobs = [float(logprobs[token])]
        if top:
            best = np.argsort(-logprobs, kind="stable")[:top]
            chunk.top_logprobs = [{int(i): float(logprobs[i]) for i in best}]

    def _abort_now(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._requests:
                self._aborted.add(request_id)

    async def abort(self, request_id: str) -> None:
        """Stop a queued or running request at its next token (no-op if finished)."""
        self._abort_now(request_id)

    # -- observation ------------------------------------------------------------------------

    def health(self) -> EngineHealth:
        """Status, loaded adapters and the waiting line (cheap)."""
        with self._lock:
            resident = list(self._resident)
        return EngineHealth(
            status=self._status,
            engine=self.name,
            base=self.config.base.name,
            resident_adapters=resident,
            running=self._running,
            waiting=self._waiting,
            detail=self._detail,
        )


def _sampling_args(params: Any) -> dict[str, Any]:
    """``Llama.generate`` settings for ``params``: penalties, top-k/min-p, bias, grammar.

    llama.cpp's ``repeat_penalty`` looks at the last 64 tokens (its ``penalty_last_n``), not the
    whole prompt as the peft engine does; ``logit_bias`` goes through a logits processor; an
    output constraint becomes a llama.cpp grammar built from its JSON Schema (json_object: the
    library's JSON grammar).
    """
    from llama_cpp import LlamaGrammar, LogitsProcessorList

    args: dict[str, Any] = {
        "top_k": max(int(params.top_k), 0), "top_p": float(params.top_p),
        "min_p": float(params.min_p), "typical_p": 1.0, "temp": float(params.temperature),
        "repeat_penalty": float(params.repetition_penalty),
        "frequency_penalty": float(params.frequency_penalty),
        "presence_penalty": float(params.presence_penalty),
    }
    if params.logit_bias:
        import numpy as np

        ids = np.array(list(params.logit_bias), dtype=np.int64)
        bias = np.array(list(params.logit_bias.values()), dtype=np.float32)

        def add_bias(_input_ids: Any, scores: Any) -> Any:
            scores[ids] += bias
            return scores

        args["logits_processor"] = LogitsProcessorList([add_bias])
    constraint = params.constraint
    if constraint is not None:
        if constraint.kind == "json_object":
            from llama_cpp.llama_grammar import JSON_GBNF

            args["grammar"] = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        else:
            args["grammar"] = LlamaGrammar.from_json_schema(json.dumps(constraint.schema),
                                                            verbose=False)
    return args

