"""The model runner: our own forward loop over a Llama-family model's submodules.

Two passes, both applying each row's LoRA through `serve.runtime.lora.LoraStack`:

- `ModelRunner.prefill`: prompts (or chunks of them) of several sequences in one pass, each
  ``[T]`` tokens at positions ``start..start+T-1`` written to its KV row; returns each last
  position's logits.
- `ModelRunner.decode`: one token for each of the ``n`` running sequences (rows ``0..n-1`` of the
  KV cache), each at its own position; returns ``[n, vocab]`` logits.

Attention is torch SDPA. Grouped-query attention in decode needs no copy: the ``heads`` query
heads of a row are viewed as ``[kv_heads, heads // kv_heads]`` queries against that kv head's
keys, and a ``[n, 1, 1, L]`` mask hides positions past each row's own length. RoPE cos/sin come
from the model's own ``inv_freq`` and ``attention_scaling`` (a table up to ``max_len``), indexed
by each row's position. Linear layers are called as modules (``Linear4bit`` and any other format
transformers loads), except plain ``nn.Linear`` on CPU with more than one row: there ``W @ x.T``
is computed instead of ``x @ W.T``; MKL's sgemm took 1.5-2.5x less CPU time for that layout with
few rows on this machine's AMD EPYC (measured per shape for 576/1536-wide layers and the 49152-row
lm_head; same values up to float rounding).

Where the job ends: the runner computes logits. Choosing tokens is `serve.runtime.sampling`;
which sequences run and when is `serve.runtime.scheduler`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serve.runtime.kv_cache import KVCache
from serve.runtime.lora import LoraBatch, LoraKernel, LoraStack

if TYPE_CHECKING:
    import torch

    from serve.runtime.base import LoadedBase

ATTN_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj")
# (KV row, prompt token ids of this chunk, start position, LoRA slot or -1)
PrefillChunk = tuple[int, list[int], int, int]
MLP_LEAVES = ("gate_proj", "up_proj", "down_proj")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = x.new_empty(x.shape)
    rotated[..., :half] = -x[..., half:]
    rotated[..., half:] = x[..., :half]
    return x * cos + rotated * sin


class ModelRunner:
    """Runs prefill and batched decode for a loaded base with stacked LoRA adapters."""

    def __init__(
        self,
        base: LoadedBase,
        *,
        max_running: int,
        max_adapters: int,
        kernel: LoraKernel = "auto",
        kv_initial_len: int = 256,
    ) -> None:
        """Prepare RoPE tables, the KV cache and an empty LoRA stack.

        Args:
            base: From `serve.runtime.base.load_base`.
            max_running: KV cache rows (sequences decoded together).
            max_adapters: LoRA stack slots.
            kernel: Mixed-batch LoRA method (see `serve.runtime.lora`).
            kv_initial_len: First KV capacity per row (grown on demand).
        """
        import torch

        self.base = base
        model = base.model
        config = model.config
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.num_layers = len(self.layers)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None)
                            or config.hidden_size // self.heads)
        self.groups = self.heads // self.kv_heads
        self.vocab_size = int(config.vocab_size)
        self.device = base.device
        self.dtype = base.compute_dtype
        self.max_len = base.max_len
        rotary = self.inner.rotary_emb
        inv_freq = rotary.inv_freq.to(device=self.device, dtype=torch.float32)
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        positions = torch.arange(self.max_len, device=self.device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scaling).to(self.dtype)
        self.sin = (emb.sin() * scaling).to(self.dtype)
        self.cache = KVCache(
            layers=self.num_layers, rows=max_running, kv_heads=self.kv_heads,
            head_dim=self.head_dim, max_len=self.max_len, dtype=self.dtype, device=self.device,
            initial_len=kv_initial_len,
        )
        self.shapes = self._module_shapes()
        self.lora = LoraStack(self.shapes, max_adapters, dtype=self.dtype, device=self.device,
                              kernel=kernel)
        self._plan: LoraBatch | None = None
        self._dense: dict[int, torch.Tensor] = {}
        if self.device.type == "cpu":
            for module in (*[getattr(layer.self_attn, leaf) for layer in self.layers
                             for leaf in ATTN_LEAVES],
                           *[getattr(layer.mlp, leaf) for layer in self.layers
                             for leaf in MLP_LEAVES], model.lm_head):
                if type(module) is torch.nn.Linear and module.bias is None:
                    self._dense[id(module)] = module.weight

    def _module_shapes(self) -> dict[str, tuple[int, int]]:
        layer = self.layers[0]
        shapes = {}
        for leaf in ATTN_LEAVES:
            module = getattr(layer.self_attn, leaf)
            shapes[leaf] = (int(module.in_features), int(module.out_features))
        for leaf in MLP_LEAVES:
            module = getattr(layer.mlp, leaf)
            shapes[leaf] = (int(module.in_features), int(module.out_features))
        return shapes

    # -- LoRA plans -------------------------------------------------------------------------

    def plan_for(self, row_slots: list[int]) -> LoraBatch:
        """Return the LoRA plan for these rows, reusing the last one when nothing changed."""
        plan = self._plan
        if (plan is None or plan.generation != self.lora.generation
                or plan.row_slots != tuple(row_slots)):
            plan = self._plan = self.lora.plan(row_slots)
        return plan

    # -- passes -----------------------------------------------------------------------------

    def _linear(self, module, x: torch.Tensor) -> torch.Tensor:
        weight = self._dense.get(id(module))
        if weight is None or x.shape[0] == 1:
            return module(x)
        return (weight @ x.T).T.contiguous()

    def _proj(self, layer: int, leaf: str, module, x: torch.Tensor,
              plan: LoraBatch) -> torch.Tensor:
        out = self._linear(module, x)
        self.lora.apply((layer, leaf), x, out, plan)
        return out

    def _mlp(self, i: int, layer, x: torch.Tensor, plan: LoraBatch) -> torch.Tensor:
        mlp = layer.mlp
        gate = self._proj(i, "gate_proj", mlp.gate_proj, x, plan)
        up = self._proj(i, "up_proj", mlp.up_proj, x, plan)
        return self._proj(i, "down_proj", mlp.down_proj, mlp.act_fn(gate) * up, plan)

    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Run prompt chunks of several sequences in one pass (linear layers batched).

        The tokens of all chunks are stacked into one ``[sum T, hidden]`` batch for every linear
        layer (each token with its sequence's LoRA slot); attention runs per sequence, causal
        over the sequence's cached prefix plus its chunk.

        Args:
            chunks: ``(row, token_ids, start, lora_slot)`` per sequence: KV row, tokens at
                positions ``start..start+T-1``, LoRA slot (``-1``: bare base).

        Returns:
            Logits ``[len(chunks), vocab]`` (fp32) of each chunk's last token.
        """
        import torch
        import torch.nn.functional as F

        sizes = [len(c[1]) for c in chunks]
        total = sum(sizes)
        self.cache.ensure(max(start + n for (_, _, start, _), n in zip(chunks, sizes,
                                                                         strict=True)))
        slots = [slot for (_, _, _, slot), n in zip(chunks, sizes, strict=True)
                 for _ in range(n)]
        plan = self.lora.plan(slots)
        ids = torch.tensor([t for c in chunks for t in c[1]], dtype=torch.long,
                           device=self.device)
        positions = torch.cat([torch.arange(start, start + n, device=self.device)
                               for (_, _, start, _), n in zip(chunks, sizes, strict=True)])
        cos = self.cos.index_select(0, positions).unsqueeze(1)
        sin = self.sin.index_select(0, positions).unsqueeze(1)
        masks = []
        for (_, _, start, _), n in zip(chunks, sizes, strict=True):
            if start:
                keys = torch.arange(start + n, device=self.device)
                masks.append(keys[None, :] <= torch.arange(start, start + n,
                                                           device=self.device)[:, None])
            else:
                masks.append(None)
        x = self.inner.embed_tokens(ids).to(self.dtype)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = x
            h = layer.input_layernorm(x)
            q = self._proj(i, "q_proj", attn.q_proj, h, plan).view(total, self.heads,
                                                                    self.head_dim)
            k = self._proj(i, "k_proj", attn.k_proj, h, plan).view(total, self.kv_heads,
                                                                    self.head_dim)
            v = self._proj(i, "v_proj", attn.v_proj, h, plan).view(total, self.kv_heads,
                                                                    self.head_dim)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            outs = []
            offset = 0
            for (row, _, start, _), n, mask in zip(chunks, sizes, masks, strict=True):
                part = slice(offset, offset + n)
                offset += n
                keys_all, values_all = self.cache.write_prefill(
                    i, row, start, k[part].transpose(0, 1), v[part].transpose(0, 1))
                q_seq = q[part].transpose(0, 1).unsqueeze(0)
                if mask is None:
                    out = F.scaled_dot_product_attention(q_seq, keys_all, values_all,
                                                         is_causal=True, enable_gqa=True)
                else:
                    out = F.scaled_dot_product_attention(q_seq, keys_all, values_all,
                                                         attn_mask=mask, enable_gqa=True)
                outs.append(out[0].transpose(0, 1).reshape(n, self.heads * self.head_dim))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            x = residual + self._proj(i, "o_proj", attn.o_proj, out, plan)
            x = x + self._mlp(i, layer, layer.post_attention_layernorm(x), plan)
        lasts = []
        offset = 0
        for (row, _, start, _), n in zip(chunks, sizes, strict=True):
            offset += n
            lasts.append(offset - 1)
            self.cache.lengths[row] = start + n
        last = self.inner.norm(x.index_select(0, torch.tensor(lasts, device=self.device)))
        return self._linear(self.model.lm_head, last).float()

    def decode(self, token_ids: list[int], positions: list[int],
               lora_slots: list[int]) -> torch.Tensor:
        """One token for each running sequence (rows ``0..n-1``), each at its own position.

        Args:
            token_ids: The last sampled token of each row.
            positions: Its position (= tokens of the row already in the cache).
            lora_slots: LoRA stack slot of each row (``-1``: bare base).

        Returns:
            Logits ``[n, vocab]`` (fp32).
        """
        import torch
        import torch.nn.functional as F

        n = len(token_ids)
        length = max(positions) + 1
        self.cache.ensure(length)
        plan = self.plan_for(lora_slots)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        flat_index = self.cache.flat_index(pos)
        x = self.inner.embed_tokens(ids).to(self.dtype)
        cos = self.cos.index_select(0, pos).unsqueeze(1)
        sin = self.sin.index_select(0, pos).unsqueeze(1)
        keys = torch.arange(length, device=self.device)
        mask = (keys[None, :] <= pos[:, None]).view(n, 1, 1, length)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = x
            h = layer.input_layernorm(x)
            q = self._proj(i, "q_proj", attn.q_proj, h, plan).view(n, self.heads, self.head_dim)
            k = self._proj(i, "k_proj", attn.k_proj, h, plan).view(n, self.kv_heads,
                                                                    self.head_dim)
            v = self._proj(i, "v_proj", attn.v_proj, h, plan).view(n, self.kv_heads,
                                                                    self.head_dim)
            q = _rotate(q, cos, sin).view(n, self.kv_heads, self.groups, self.head_dim)
            k = _rotate(k, cos, sin)
            keys_n, values_n = self.cache.write_decode(i, flat_index, k, v, length)
            out = F.scaled_dot_product_attention(q, keys_n, values_n, attn_mask=mask)
            out = out.reshape(n, self.heads * self.head_dim)
            x = residual + self._proj(i, "o_proj", attn.o_proj, out, plan)
            x = x + self._mlp(i, layer, layer.post_attention_layernorm(x), plan)
        for row, position in enumerate(positions):
            self.cache.lengths[row] = position + 1
        return self._linear(self.model.lm_head, self.inner.norm(x)).float()
