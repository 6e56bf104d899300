"""The model runner: one forward for every family, decode rows and prefill chunks in one pass.

`ModelRunner.forward` takes, in one step, the ``n`` running sequences' next tokens (KV rows
``0..n-1``, each at its own position) and any number of prompt chunks (each for one KV row,
positions ``start..start+T-1``). All their tokens go through every projection together, each
token with its sequence's LoRA slot (`serve.runtime.lora`), so a long prefill never stalls the
running streams: the scheduler caps the tokens per step. Attention is per kind: the decode rows
batched against the KV cache (grouped-query heads viewed as ``[kv_heads, groups]`` queries, no
copy), each chunk causal over its row's prefix plus itself; sliding windows and soft-capping
come from the layer (`serve.runtime.weights.LayerWeights`).

Per layer and step: 2 norms (4 for Gemma), each fused with the in-place residual add before
it, 4 fused projections (each + its LoRA), one RoPE on q|k together (pair-adjacent layout:
``x * cos + swap_pairs(x) * sin``), the KV writes, one attention call per kind. In bf16 on CPU
the norms, RoPE and the gated activation are one native call each (`serve.runtime.native`);
fp32 keeps torch's ops, the reference for the token-exact tests. Decode attention is native
where that measured faster at start (`serve.runtime.dtype_choice`).

Where the job ends: the runner computes logits. Choosing tokens is `serve.runtime.sampling`;
which sequences run and when is `serve.runtime.scheduler`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hub.machine import MeasurementCache
from serve.runtime.kv_cache import KVCache
from serve.runtime.logits import refine_top
from serve.runtime.lora import LoraBatch, LoraStack
from serve.runtime.weights import PROJECTIONS, LayerWeights, Projection, build_weights

if TYPE_CHECKING:
    import torch

    from serve.runtime.base import LoadedBase
    from serve.runtime.threads_choice import ThreadPlan

log = logging.getLogger("loradock.serve")

# (KV row, prompt token ids of this chunk, start position, LoRA slot or -1)
PrefillChunk = tuple[int, list[int], int, int]
# Prompt chunks up to this many tokens join the step's single native attention call (a token
# is one query there); longer ones go to SDPA, which handles a long causal block as matmuls.
NATIVE_CHUNK = 64


@dataclass
class DecodeRows:
    """The running sequences' next tokens: row ``i`` of the KV cache is ``token_ids[i]``."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]


class ModelRunner:
    """Runs mixed decode + prefill passes for a loaded base with pooled LoRA adapters."""

    def __init__(self, base: LoadedBase, *, max_running: int, max_adapters: int,
                 kv_initial_len: int = 256, lora_dtype: torch.dtype | None = None,
                 lora_kernel: str = "torch", attention_kernel: str = "sdpa",
                 nf4_kernel_rows: int = -1, model_id: Any = None,
                 measurements: MeasurementCache | None = None) -> None:
        """Fuse the weights, build RoPE tables, the KV cache and an empty LoRA stack.

        Args:
            base: From `serve.runtime.base.load_base`.
            max_running: KV cache rows (sequences decoded together).
            max_adapters: Adapters resident at once.
            kv_initial_len: First KV capacity per row (grown on demand, shrunk back).
            lora_dtype: Dtype of the LoRA weights and deltas (default: the compute dtype).
            lora_kernel: ``torch`` or ``native`` (`serve.runtime.lora.LoraStack`).
            attention_kernel: Decode attention by ``sdpa`` (torch's) or ``native``
                (`serve.runtime.native.DecodeAttention`; SDPA where it cannot be loaded).
            nf4_kernel_rows: An nf4-dense base on CPU runs passes of up to this many rows by
                its 4-bit codes (`serve.runtime.nf4_kernel`); 0: never; -1: measured.
            model_id: What identifies the weights and their dense path (keys the measurement).
            measurements: Where that measurement is cached (None: not cached).
        """
        import torch

        self.base = base
        model = base.model
        self.model = model
        self.inner = model.model
        self.spec = base.spec
        self.device = base.device
        self.dtype = base.compute_dtype
        self.max_len = base.max_len
        self.vocab_size = int(model.config.vocab_size)
        tables = self._rope_tables()
        rotary_dim = next(iter(tables.values()))[0].shape[-1]
        nf4 = (base.dtype_name == "nf4-dense" and self.device.type == "cpu"
               and nf4_kernel_rows != 0)
        self.weights = build_weights(model, self.spec, self.dtype, rotary_dim, nf4=nf4)
        w = self.weights
        self.layers: list[LayerWeights] = w.layers
        self.num_layers = len(self.layers)
        self.heads, self.kv_heads, self.head_dim = w.heads, w.kv_heads, w.head_dim
        self.groups = self.heads // self.kv_heads
        self.eps = w.eps
        self.cos, self.sin = {}, {}
        for kind, (cos, sin) in tables.items():
            self.cos[kind], self.sin[kind] = self._pair_layout(cos, sin, w.head_dim)
        model.to(self.dtype)  # embeddings, final norm and lm_head (the layers were fused)
        self.final_norm = (self.inner.norm.weight.detach().float()
                           + self.spec.norm_offset).to(self.dtype)
        self.head_weight = model.lm_head.weight  # kept dense: `refine_top` reads its rows
        self.lm_head = Projection(self.head_weight)
        if base.dtype_choice is not None and base.dtype_choice.kernel == "onednn":
            # The embedding keeps its (tied) weight; the lm_head gets its own reordered copy.
            for p in [*(getattr(layer, name) for layer in self.layers for name in PROJECTIONS),
                      self.lm_head]:
                p.pack()  # False (kept on F.linear) where this torch build has no oneDNN
        # Small passes of an nf4-dense base by its 4-bit codes (serve.runtime.nf4_kernel).
        self.nf4_reason = self._choose_nf4_rows(nf4_kernel_rows, model_id,
                                                measurements or MeasurementCache(None))
        softcap_attr = self.spec.final_softcap_attr
        self.final_softcap = getattr(model.config, softcap_attr, None) if softcap_attr else None
        self.cache = KVCache(
            layers=self.num_layers, rows=max_running, kv_heads=self.kv_heads,
            head_dim=self.head_dim, max_len=self.max_len, dtype=self.dtype, device=self.device,
            initial_len=kv_initial_len,
        )
        self.shapes = {name: (w.in_features[name], [size for _, size in w.parts[name]])
                       for name in PROJECTIONS}
        self.offsets = {name: [offset for offset, _ in w.parts[name]] for name in PROJECTIONS}
        self.lora = LoraStack(self.shapes, max_adapters, dtype=lora_dtype or self.dtype,
                              device=self.device, kernel=lora_kernel)
        self._plan: LoraBatch | None = None
        self.attention = None
        if attention_kernel == "native" and self.device.type == "cpu":
            from serve.runtime.native import DecodeAttention

            self.attention = DecodeAttention.load(self.dtype)
        # The element-wise work between matmuls in one native pass each, in bf16: RMSNorm
        # with the residual add before it (torch: a dozen ops around fp32 casts), RoPE in
        # place, and silu(gate) * up; each computes in fp32 and rounds once. fp32 keeps torch's
        # ops: it is the reference the token-exact tests compare with transformers, where
        # another summation order could flip a near-tie.
        self.rms = self.rope = self.silu_mul = None
        if self.dtype == torch.bfloat16 and self.device.type == "cpu":
            from serve.runtime.native import RmsNorm, Rope, SiluMul

            self.rms, self.rope = RmsNorm.load(self.dtype), Rope.load(self.dtype)
            if all(computes_silu(layer.act) for layer in self.layers):
                self.silu_mul = SiluMul.load(self.dtype)
        # Threads per pass (serve.runtime.threads_choice); None: leave torch's setting alone.
        self.thread_plan: ThreadPlan | None = None
        self.qk = (self.heads + self.kv_heads) * self.head_dim
        self.inter = self.shapes["down"][0]
        self._torch = torch

    # -- set-up -----------------------------------------------------------------------------

    def _rope_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin ``[max_len, rotary_dim]`` from the model's own rotary module, per type."""
        import torch

        rotary = self.inner.rotary_emb
        positions = torch.arange(self.max_len, device=self.device)[None]
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        if not self.spec.rope_per_layer_type:
            cos, sin = rotary(probe, positions)
            return {"default": (cos[0], sin[0])}
        kinds = sorted({layer.self_attn.layer_type for layer in self.inner.layers})
        return {kind: tuple(t[0] for t in rotary(probe, positions, kind)) for kind in kinds}

    def _pair_layout(self, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's half-split tables in the pair-adjacent layout, signed, padded to ``head_dim``."""
        import torch

        from serve.runtime.weights import head_perm

        rot = cos.shape[-1]
        perm = torch.tensor(head_perm(rot, rot))
        sign = torch.tensor([-1.0, 1.0]).repeat(rot // 2)
        cos_p, sin_p = cos.float()[:, perm], sin.float()[:, perm] * sign
        if rot < head_dim:  # partial rotary: the other dims pass through unchanged
            pad = head_dim - rot
            cos_p = torch.cat([cos_p, torch.ones(cos_p.shape[0], pad)], dim=1)
            sin_p = torch.cat([sin_p, torch.zeros(sin_p.shape[0], pad)], dim=1)
        return cos_p.to(self.dtype).contiguous(), sin_p.to(self.dtype).contiguous()

    def _choose_nf4_rows(self, forced: int, model_id: Any, cache: MeasurementCache) -> str:
        """Set the rows up to which passes use the 4-bit-code kernel; say why ("": not used).

        Args:
            forced: That many rows (0: never), or -1: time the kernel against the dense
                projections of every layer and use it up to the rows where it is faster.
            model_id: What identifies the weights (keys the cached timing).
            cache: Where the timing is cached.
        """
        projections = [getattr(layer, name) for layer in self.layers for name in PROJECTIONS]
        if not projections or any(p.small is None for p in projections):
            for p in projections:
                p.small = None
            return ""
        from serve.runtime.nf4_kernel import choose

        rows, reason = choose(projections, self.dtype, forced, model_id, cache)
        for p in projections:
            p.small_rows = rows
            if rows == 0:
                p.small = None  # not used here: do not hold the codes
        log.info("%s", reason)
        return reason

    # -- LoRA plans -------------------------------------------------------------------------

    def plan_for(self, row_slots: list[int]) -> LoraBatch:
        """The LoRA plan for these rows, reusing the last one when nothing changed."""
        plan = self._plan
        if (plan is None or plan.generation != self.lora.generation
                or plan.row_slots != tuple(row_slots)):
            plan = self._plan = self.lora.plan(row_slots)
        return plan

    # -- the pass ---------------------------------------------------------------------------

    def forward(self, decode: DecodeRows | None, chunks: list[PrefillChunk]) -> torch.Tensor:
        """One pass over the decode rows and the prompt chunks.

        Args:
            decode: The running sequences' next tokens (rows ``0..n-1``), or None.
            chunks: ``(row, token_ids, start, lora_slot)`` per prompt chunk.

        Returns:
            Logits ``[n + len(chunks), vocab]`` (fp32): each decode row's, then each chunk's
            last token's.
        """
        torch = self._torch
        n = len(decode.token_ids) if decode is not None else 0
        sizes = [len(c[1]) for c in chunks]
        ids, positions, slots = [], [], []
        if decode is not None:
            ids += decode.token_ids
            positions += decode.positions
            slots += decode.slots
        for (_, tokens, start, slot), size in zip(chunks, sizes, strict=True):
            ids += tokens
            positions += range(start, start + size)
            slots += [slot] * size
        longest = max(positions) + 1
        if self.thread_plan is not None:
            torch.set_num_threads(self.thread_plan.for_tokens(len(ids)))
        self.cache.ensure(longest)
        plan = self.plan_for(slots) if not chunks else self.lora.plan(slots)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        if self.rope is not None:  # it reads the tables at each token's position itself
            tables = {kind: (self.cos[kind], self.sin[kind]) for kind in self.cos}
        else:
            tables = {kind: (self.cos[kind].index_select(0, pos).unsqueeze(1),
                             self.sin[kind].index_select(0, pos).unsqueeze(1))
                      for kind in self.cos}
        masks = _Masks(self, decode, chunks, pos, n)
        x = self.inner.embed_tokens(torch.tensor(ids, dtype=torch.long,
                                                 device=self.device)).to(self.dtype)
        # Each residual add is fused with the norm after it (the next layer's, or the final).
        h = self._norm(x, self.layers[0].attn_in)
        for i, layer in enumerate(self.layers):
            qkv = self._project(i, "qkv", layer.qkv, h, plan)
            attn = self._attention(i, layer, qkv, tables[layer.rope], masks, n, chunks, sizes)
            out = self._project(i, "o", layer.o, attn, plan)
            if layer.attn_out is not None:  # Gemma: the sublayer's output is normed first
                out = self._norm(out, layer.attn_out)
            h = self._add_norm(x, out, layer.mlp_in)
            gate_up = self._project(i, "gate_up", layer.gate_up, h, plan)
            act = (self.silu_mul(gate_up) if self.silu_mul is not None
                   else layer.act(gate_up[:, :self.inter]).mul_(gate_up[:, self.inter:]))
            out = self._project(i, "down", layer.down, act, plan)
            if layer.mlp_out is not None:
                out = self._norm(out, layer.mlp_out)
            following = (self.layers[i + 1].attn_in if i + 1 < self.num_layers
                         else self.final_norm)
            h = self._add_norm(x, out, following)
        if decode is not None:
            for row, position in enumerate(decode.positions):
                self.cache.lengths[row] = position + 1
        lasts = list(range(n))
        offset = n
        for (row, _, start, _), size in zip(chunks, sizes, strict=True):
            offset += size
            lasts.append(offset - 1)
            self.cache.lengths[row] = start + size
        if len(lasts) != h.shape[0]:
            h = h.index_select(0, torch.tensor(lasts, device=self.device))
        logits = refine_top(self.lm_head(h), h, self.head_weight)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.rms is not None:
            return self.rms(x, weight, self.eps)
        return self._torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def _add_norm(self, x: torch.Tensor, residual: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
        """``x += residual`` (in place), then ``x``'s norm by ``weight``."""
        if self.rms is not None:
            return self.rms(x, weight, self.eps, residual)
        x.add_(residual)
        return self._norm(x, weight)

    def _project(self, i: int, name: str, projection, x: torch.Tensor,
                 plan: LoraBatch) -> torch.Tensor:
        out = projection(x)
        if not plan.empty:
            self.lora.apply((i, name), x, out, plan, self.offsets[name])
        return out

    def _attention(self, i: int, layer: LayerWeights, qkv: torch.Tensor, table, masks: _Masks,
                   n: int, chunks: list[PrefillChunk], sizes: list[int]) -> torch.Tensor:
        """RoPE, KV writes and attention for all rows; returns ``[rows, heads * head_dim]``."""
        torch = self._torch
        rows = qkv.shape[0]
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        qk = qkv[:, :self.qk].view(rows, heads + kv_heads, d)
        if layer.q_norm is not None:
            qk = torch.cat([
                torch.nn.functional.rms_norm(qk[:, :heads], (d,), layer.q_norm, self.eps),
                torch.nn.functional.rms_norm(qk[:, heads:], (d,), layer.k_norm, self.eps)], 1)
        cos, sin = table
        if self.rope is not None:
            self.rope(qk, masks.pos, cos, sin)  # in place (q|k of qkv, or the normed copy)
        else:
            swapped = qk.reshape(rows, heads + kv_heads, d // 2, 2).flip(-1).view(rows, -1, d)
            qk = (qk * cos).addcmul_(swapped, sin)
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, self.qk:].view(rows, kv_heads, d)
        if self.attention is not None and all(size <= NATIVE_CHUNK for size in sizes):
            return self._attend_native(i, layer, q, k, v, masks, n, chunks, sizes)
        outs = []
        if n:
            keys, values = self.cache.write_decode(i, masks.flat_index, k[:n], v[:n],
                                                   masks.decode_len)
            query = q[:n].view(n, kv_heads, self.groups, d)
            mask = masks.decode(layer.window, additive=layer.softcap is None)
            outs.append(_attend(query, keys, values, mask, layer).reshape(n, heads * d))
        offset = n
        for c, ((row, _, start, _), size) in enumerate(zip(chunks, sizes, strict=True)):
            part = slice(offset, offset + size)
            offset += size
            keys, values = self.cache.write_prefill(i, row, start, k[part].transpose(0, 1),
                                                    v[part].transpose(0, 1))
            query = q[part].transpose(0, 1).unsqueeze(0)
            out = _attend(query, keys, values, masks.prefill(c, layer.window), layer, gqa=True)
            outs.append(out[0].transpose(0, 1).reshape(size, heads * d))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _attend_native(self, i: int, layer: LayerWeights, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, masks: _Masks, n: int, chunks: list[PrefillChunk],
                       sizes: list[int]) -> torch.Tensor:
        """Every row's attention in one native call: decode rows and short chunks' tokens.

        The step's keys and values are written first; then each token is one query over its KV
        row up to its own position (`serve.runtime.native.DecodeAttention`).
        """
        if n:
            self.cache.write_decode(i, masks.flat_index, k[:n], v[:n], masks.decode_len)
        offset = n
        for (row, _, start, _), size in zip(chunks, sizes, strict=True):
            part = slice(offset, offset + size)
            offset += size
            self.cache.write_prefill(i, row, start, k[part].transpose(0, 1),
                                     v[part].transpose(0, 1))
        kv_rows, lo, hi = masks.native(layer.window)
        out = self._torch.empty(q.shape[0], self.heads * self.head_dim, dtype=self.dtype,
                                device=self.device)
        self.attention(q.flatten(1), self.cache.k[i], self.cache.v[i], lo, hi, layer.scaling,
                       layer.softcap, out, kv_rows=kv_rows)
        return out


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            mask: torch.Tensor | None, layer: LayerWeights, *, gqa: bool = False,
            ) -> torch.Tensor:
    """Attention of ``query`` over ``keys``/``values`` (``[b, heads, L, d]``).

    Args:
        query: ``[b, kv_heads, m, d]`` (decode: the groups as rows), or ``[1, heads, T, d]``
            with ``gqa`` (prefill).
        keys: Keys ``[b, kv_heads, L, d]``.
        values: Values, same shape.
        mask: Boolean (True where attending) or additive (SDPA only), broadcastable to the
            scores; None: causal.
        layer: Its scaling and soft-cap.
        gqa: The query has all heads (prefill); kv heads are shared by ``heads // kv_heads``.
    """
    import torch
    import torch.nn.functional as F

    if layer.softcap is None:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                              is_causal=mask is None, scale=layer.scaling,
                                              enable_gqa=gqa)
    b, heads, m, d = query.shape
    if mask is None:
        mask = torch.ones(m, keys.shape[2], dtype=torch.bool, device=query.device).tril()
    if gqa:  # the heads sharing one kv head become rows of one query block
        groups = heads // keys.shape[1]
        query = query.reshape(b, keys.shape[1], groups * m, d)
        mask = mask.repeat(groups, 1)
    scores = torch.matmul(query, keys.transpose(-1, -2)) * layer.scaling
    scores = torch.tanh(scores / layer.softcap) * layer.softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, values)
    return out.view(b, heads, m, d) if gqa else out


def computes_silu(act) -> bool:
    """Whether the activation module ``act`` is SiLU, judged by what it computes.

    transformers' ``"silu"`` is its own ``SiLUActivation`` class, not ``torch.nn.SiLU``: a type
    check missed it and left the gated MLP on torch's two ops instead of the native kernel.
    """
    import torch

    probe = torch.linspace(-8, 8, 161)
    return bool(torch.equal(act(probe), torch.nn.functional.silu(probe)))


class _Masks:
    """Attention masks of one step, built once per distinct sliding window."""

    def __init__(self, runner: ModelRunner, decode: DecodeRows | None,
                 chunks: list[PrefillChunk], pos: torch.Tensor, n: int) -> None:
        import torch

        self.torch = torch
        self.device = runner.device
        self.chunks = chunks
        self.pos, self.n = pos, n
        decode_pos = self.decode_pos = pos[:n]
        self.decode_len = (max(decode.positions) + 1) if decode is not None else 0
        self.flat_index = runner.cache.flat_index(decode_pos) if decode is not None else None
        self.dtype = runner.dtype
        self._decode: dict[tuple[int | None, bool], torch.Tensor] = {}
        self._native: dict[int | None, tuple] = {}
        self._prefill: dict[tuple[int, int | None], torch.Tensor | None] = {}

    def decode(self, window: int | None, additive: bool = False) -> torch.Tensor:
        """``[n, 1, 1, L]``: key ``j`` visible to row ``i`` (``j <= pos_i``, in the window).

        ``additive``: as ``0`` / ``-inf`` in the compute dtype, built once per step: SDPA turns
        a boolean mask into that on every call (measured 5-10 % of its time at decode sizes).
        """
        mask = self._decode.get((window, additive))
        if mask is None:
            torch = self.torch
            if additive:
                visible = self.decode(window)
                mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
                mask.masked_fill_(~visible, float("-inf"))
            else:
                keys = torch.arange(self.decode_len, device=self.device)[None, :]
                pos = self.decode_pos[:, None]
                mask = keys <= pos
                if window:
                    mask &= keys > pos - window
                mask = mask[:, None, None, :]
            self._decode[(window, additive)] = mask
        return mask

    def native(self, window: int | None,
               ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Each token's KV row (None: decode rows only) and visible keys, for native.

        Visible keys are ``lo .. hi - 1`` (int32), by the same rule as `decode` and
        `prefill`: ``j <= pos`` and, with a window, ``j > pos - window``.
        """
        got = self._native.get(window)
        if got is None:
            torch = self.torch
            kv_rows = None
            if self.chunks:
                rows = list(range(self.n))
                for row, tokens, _, _ in self.chunks:
                    rows += [row] * len(tokens)
                kv_rows = torch.tensor(rows, dtype=torch.int32)
            hi = (self.pos + 1).to(torch.int32)
            lo = ((self.pos - window + 1).clamp_(min=0).to(torch.int32) if window
                  else torch.zeros_like(hi))
            got = self._native[window] = (kv_rows, lo, hi)
        return got

    def prefill(self, c: int, window: int | None) -> torch.Tensor | None:
        """``[T, start + T]`` for chunk ``c``, or None where plain causal is right."""
        key = (c, window)
        if key in self._prefill:
            return self._prefill[key]
        torch = self.torch
        row, tokens, start, _ = self.chunks[c]
        size = len(tokens)
        mask = None
        if start or (window and start + size > window):
            keys = torch.arange(start + size, device=self.device)[None, :]
            pos = torch.arange(start, start + size, device=self.device)[:, None]
            mask = keys <= pos
            if window:
                mask &= keys > pos - window
        self._prefill[key] = mask
        return mask
