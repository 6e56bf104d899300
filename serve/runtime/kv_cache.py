"""The slot KV cache: one row per running sequence, rows kept compact, length grown on demand.

Keys and values live in two tensors ``[layers, max_running, kv_heads, capacity, head_dim]``.
Running sequences occupy rows ``0..n-1``, so the decode batch is the view ``[:, :n, :, :L]``
(no gather). When a sequence leaves, the scheduler moves a later row's prefix into the hole
(`KVCache.move`) and shrinks the used count, keeping the rows compact. ``capacity`` starts
small and doubles (up to ``max_len``) when a sequence reaches it, so memory follows the longest
running sequence, not the model's context.

Where the job ends: this module stores and moves tensors. Which sequence owns which row, and
when rows are freed, is the scheduler's job; attention over the rows is the runner's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hub.errors import InvalidInput

if TYPE_CHECKING:
    import torch


class KVCache:
    """Per-layer keys and values for up to ``rows`` sequences."""

    def __init__(
        self,
        *,
        layers: int,
        rows: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        initial_len: int = 256,
    ) -> None:
        """Allocate the cache with ``initial_len`` positions per row (grown later)."""
        import torch

        self.layers, self.rows, self.kv_heads, self.head_dim = layers, rows, kv_heads, head_dim
        self.max_len = max_len
        self.capacity = self.initial_len = max(16, min(initial_len, max_len))
        self.peak = self.capacity  # largest capacity reached (memory high-water mark)
        shape = (layers, rows, kv_heads, self.capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * rows  # tokens stored per row
        self.used = 0  # rows 0..used-1 belong to running sequences

    # -- rows -------------------------------------------------------------------------------

    def allocate(self) -> int:
        """Take the next free row (the caller checked that one is free)."""
        if self.used >= self.rows:
            raise InvalidInput(f"All {self.rows} KV cache rows are in use",
                               fix="Raise max_running.")
        row = self.used
        self.used += 1
        self.lengths[row] = 0
        return row

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src``'s prefix into row ``dst`` (the caller then owns ``dst``)."""
        n = self.lengths[src]
        if n:
            self.k[:, dst, :, :n].copy_(self.k[:, src, :, :n])
            self.v[:, dst, :, :n].copy_(self.v[:, src, :, :n])
        self.lengths[dst] = n
        self.lengths[src] = 0

    def shrink(self, used: int) -> None:
        """Mark rows ``used..`` free (their content was moved or is garbage)."""
        for row in range(used, self.used):
            self.lengths[row] = 0
        self.used = used

    def ensure(self, length: int) -> None:
        """Grow capacity (doubling, up to ``max_len``) so that ``length`` positions fit."""
        import torch

        if length <= self.capacity:
            return
        if length > self.max_len:
            raise InvalidInput(f"Sequence of {length} tokens is over max_model_len={self.max_len}",
                               fix="Send a shorter prompt or fewer max_tokens.")
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        capacity = min(capacity, self.max_len)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(*old.shape[:3], capacity, old.shape[4], dtype=old.dtype,
                              device=old.device)
            new[:, :, :, : self.capacity].copy_(old)
            setattr(self, name, new)
        self.capacity = capacity
        self.peak = max(self.peak, capacity)

    def shrink_to(self, longest: int) -> None:
        """Halve capacity (down to the initial length) while ``longest`` fits in a quarter.

        Called between steps with the longest length a running sequence can reach, so the memory
        a long request grew is given back once it has left.
        """
        import torch

        capacity = self.capacity
        while capacity > self.initial_len and max(longest, 1) * 4 <= capacity:
            capacity //= 2
        capacity = max(capacity, self.initial_len)
        if capacity == self.capacity:
            return
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(*old.shape[:3], capacity, old.shape[4], dtype=old.dtype,
                              device=old.device)
            new.copy_(old[:, :, :, :capacity])
            setattr(self, name, new)
        self.capacity = capacity

    # -- reads and writes -------------------------------------------------------------------

    def write_prefill(
        self, layer: int, row: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` ``[kv_heads, T, head_dim]`` at ``start`` of ``row``.

        Returns:
            Keys and values of the row's whole prefix ``[1, kv_heads, start + T, head_dim]``.
        """
        end = start + k.shape[1]
        self.k[layer, row, :, start:end].copy_(k)
        self.v[layer, row, :, start:end].copy_(v)
        return self.k[layer, row:row + 1, :, :end], self.v[layer, row:row + 1, :, :end]

    def flat_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Index of (row i, every kv head, ``positions[i]``) in a layer's flattened keys.

        Rows are ``0..n-1`` (``n = len(positions)``); computed once per decode step.
        """
        import torch

        n = positions.shape[0]
        rows = torch.arange(n, device=positions.device)[:, None] * self.kv_heads
        heads = torch.arange(self.kv_heads, device=positions.device)[None, :]
        return ((rows + heads) * self.capacity + positions[:, None]).reshape(-1)

    def write_decode(
        self, layer: int, flat_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one token per row (``k``/``v`` ``[n, kv_heads, head_dim]``) at its position.

        Args:
            layer: Layer index.
            flat_index: From `flat_index` for this step's positions.
            k: New keys.
            v: New values.
            length: Longest row length after the write.

        Returns:
            Views ``[n, kv_heads, length, head_dim]`` of rows ``0..n-1``.
        """
        n = k.shape[0]
        keys, values = self.k[layer], self.v[layer]
        keys.view(-1, self.head_dim).index_copy_(0, flat_index, k.reshape(-1, self.head_dim))
        values.view(-1, self.head_dim).index_copy_(0, flat_index, v.reshape(-1, self.head_dim))
        return keys[:n, :, :length], values[:n, :, :length]

    def nbytes(self) -> int:
        """Bytes held by keys and values."""
        return 2 * self.k.numel() * self.k.element_size()
