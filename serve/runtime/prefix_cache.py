"""Prompt-prefix KV reuse: vLLM's automatic prefix caching, done by copy into a sequence's row.

Chat requests share long prefixes: the template's default system turn (SmolLM2's is 27 of a
typical 37-token prompt), a recipe's system prompt, few-shot examples. Their keys and values
depend only on the tokens before them and on the adapter (LoRA changes the k/v projections), so
they can be computed once and copied.

Prompts are cut into blocks of ``block`` tokens. A block is known by a chain key: the hash of
(its parent block's key, its tokens), under the adapter's key (``NAME@V``, or None for the
bare base; a new version is a new key, so a stale prefix is never reused). Each entry keeps
its parent key and tokens and is checked on lookup, so a hash collision cannot serve another
prompt's values. Only full blocks that end before the prompt's last token are reused: that token
is always computed, since its logits give the first generated token.

An entry holds ``[layers, kv_heads, block, head_dim]`` keys and values in the KV cache's dtype,
copied out of a row after its prompt was prefilled (`store`) and into a new row before its
prefill (`restore`), one copy per tensor for all layers. Entries are evicted least recently
used first within ``max_bytes``.

Where the job ends: this module copies KV blocks; deciding when (admission, after a prefill)
is `serve.runtime.scheduler`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from serve.runtime.kv_cache import KVCache

ROOT = 0  # the parent key of a prompt's first block


@dataclass
class Block:
    """One cached block of a prompt's keys and values."""

    parent: int
    tokens: tuple[int, ...]
    k: torch.Tensor  # [layers, kv_heads, block, head_dim]
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes held by its tensors."""
        return 2 * self.k.numel() * self.k.element_size()


class PrefixCache:
    """Blocks of prompt KV shared between requests of the same adapter (or the base)."""

    def __init__(self, kv: KVCache, max_bytes: int, block: int = 8) -> None:
        """Create an empty cache.

        Args:
            kv: The runner's KV cache (rows are copied to and from it).
            max_bytes: Memory for blocks; 0 turns reuse off.
            block: Tokens per block.
        """
        self.kv = kv
        self.max_bytes = max_bytes
        self.block = block
        self._blocks: OrderedDict[tuple[str | None, int], Block] = OrderedDict()
        self.nbytes = 0
        self.hit_tokens = 0

    @property
    def enabled(self) -> bool:
        """True when blocks may be kept."""
        return self.max_bytes > 0

    def _chain(self, prompt: list[int], limit: int) -> list[tuple[int, int, tuple[int, ...]]]:
        """``(parent key, key, tokens)`` of each full block of ``prompt[:limit]``."""
        out, parent = [], ROOT
        for start in range(0, limit - self.block + 1, self.block):
            tokens = tuple(prompt[start:start + self.block])
            key = hash((parent, tokens))
            out.append((parent, key, tokens))
            parent = key
        return out

    def restore(self, adapter: str | None, prompt: list[int], row: int) -> int:
        """Copy the longest cached prefix of ``prompt`` into ``row``; return its length.

        The caller made sure the row's capacity holds the prompt (`KVCache.ensure`).
        """
        if not self.enabled:
            return 0
        found: list[Block] = []
        for parent, key, tokens in self._chain(prompt, len(prompt) - 1):
            entry = self._blocks.get((adapter, key))
            if entry is None or entry.parent != parent or entry.tokens != tokens:
                break
            self._blocks.move_to_end((adapter, key))
            found.append(entry)
        if not found:
            return 0
        import torch

        length = len(found) * self.block
        self.kv.k[:, row, :, :length].copy_(torch.cat([b.k for b in found], dim=2))
        self.kv.v[:, row, :, :length].copy_(torch.cat([b.v for b in found], dim=2))
        self.kv.lengths[row] = length
        self.hit_tokens += length
        return length

    def store(self, adapter: str | None, prompt: list[int], row: int) -> None:
        """Keep the full blocks of ``prompt`` (prefilled in ``row``) not cached yet."""
        if not self.enabled:
            return
        for i, (parent, key, tokens) in enumerate(self._chain(prompt, len(prompt) - 1)):
            if (adapter, key) in self._blocks:
                self._blocks.move_to_end((adapter, key))
                continue
            start, end = i * self.block, (i + 1) * self.block
            entry = Block(parent, tokens, self.kv.k[:, row, :, start:end].clone(),
                          self.kv.v[:, row, :, start:end].clone())
            self._blocks[(adapter, key)] = entry
            self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes and self._blocks:
            _, evicted = self._blocks.popitem(last=False)
            self.nbytes -= evicted.nbytes
