"""Batched multi-LoRA on fused projections: adapter pools by rank and the mixed-batch delta.

The runner's projections are fused (``qkv``, ``o``, ``gate_up``, ``down``; see
`serve.runtime.weights`). An adapter's LoRA on a projection is stored as one ``A`` whose rows are
its parts' A's stacked (``[parts * r, in]``: q, k, v for ``qkv``) and one ``B^T`` per part
(``[r, size]``, scaling folded in, q/k columns in the RoPE layout), so a fused projection needs
one shrink matmul and one expand per part. Parts an adapter does not target hold zeros. (A
block-diagonal ``B^T`` over the fused output, one expand per projection, measured slower in
fp32 and 1.5x the memory; see `serve.runtime.dtype_choice` for the LoRA dtype.)

Adapters live in *pools*, one per rank: each adapter keeps its own rank (a rank-8 adapter next
to a rank-64 one costs rank-8 arithmetic). A pool's tensors are ``[capacity, ...]`` and
allocated zeroed (untouched slots cost no resident memory). A *slot* is ``(rank, index)``
flattened into one int by `LoraStack` for the scheduler.

A forward pass gives each row (one token of one sequence) a slot or ``-1`` (bare base). Per pool
used by the batch (`LoraBatch`):

- one slot for every row: ``h = x @ A.T`` and an ``addmm_`` per part (1 + parts ops);
- otherwise Punica's SGMV as dense ops: the rows of each used adapter are gathered into one
  equal-width segment (pads gather row 0 and are zeroed), one ``bmm`` against the used
  adapters' A's, one ``bmm`` per part against their B's, and the deltas gathered back into row
  order (rows of other pools read a zero pad) and added: gathers, because ``index_select``
  measured 10-20x faster than ``index_add_`` at these sizes here. A's are stored transposed
  (``[in, parts * r]``): a transposed view made bf16 ``bmm`` 2.5x slower.
  Slots no row uses are never multiplied; arithmetic is the minimum up to the pads. The used
  slices are views when the used indices are consecutive (indices are handed out lowest
  first), else one gather of the used adapters' weights.

With ``kernel="native"`` (chosen by measurement, `serve.runtime.dtype_choice`) the whole delta
of one projection for one pool is a single call of the C kernel in `serve.runtime.native`: rows
grouped by adapter, no pads, no gathers, fp32 accumulation. On a 2-core AVX512-BF16 machine one
layer's four projections at 16 rows took 0.11 ms (one adapter) and 0.20 ms (8 adapters) there
against 0.33 and 0.86 ms in the torch path above, whose tiny bf16 matmuls cost 35-65 us each.

Where the job ends: this module holds tensors and does arithmetic. Reading adapter files is
`serve.runtime.adapter_files`; which adapter owns which slot is `serve.runtime.adapter_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# (layer, projection name)
ModuleKey = tuple[int, str]
# Pool indices are packed into one int: rank * SLOT_BASE + index.
SLOT_BASE = 1 << 16


@dataclass
class AdapterWeights:
    """One adapter's LoRA tensors, ready to install.

    Attributes:
        modules: ``{(layer, projection): (a [parts * r, in], [bt_part [r, size], ...])}``.
        rank: The adapter's (largest) rank: the pool it goes to.
        file_bytes: Size of the weights file it was read from (for memory ratios).
    """

    modules: dict[ModuleKey, tuple[torch.Tensor, list[torch.Tensor]]]
    rank: int
    file_bytes: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        return sum(a.numel() * a.element_size() + sum(b.numel() * b.element_size() for b in bts)
                   for a, bts in self.modules.values())


@dataclass
class AdapterCopy:
    """One adapter's rows of its pool, copied out (``{key: (A^T, [B^T per part])}``)."""

    rank: int
    rows: dict[ModuleKey, tuple[torch.Tensor, list[torch.Tensor]]]

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(a.numel() * a.element_size() + sum(b.numel() * b.element_size() for b in bts)
                   for a, bts in self.rows.values())


@dataclass
class Pool:
    """All resident adapters of one rank."""

    rank: int
    capacity: int
    at: dict[ModuleKey, torch.Tensor] = field(default_factory=dict)  # [capacity, in, parts*r]
    bt: dict[ModuleKey, list[torch.Tensor]] = field(default_factory=dict)  # [capacity, r, size]
    targets: dict[ModuleKey, set[int]] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)
    # The native kernel's constant arguments per key (pointers into the tensors above).
    native: dict[ModuleKey, tuple] = field(default_factory=dict)


@dataclass
class PoolPlan:
    """How the rows of one pass use one pool."""

    rank: int
    uniform: int = -1  # every row uses this pool index (no gather needed)
    used: frozenset[int] = frozenset()
    gather: torch.Tensor | None = None  # [len(order) * width] row of each segment position
    scatter: torch.Tensor | None = None  # [rows] segment position of each row (pad if absent)
    pad_mask: torch.Tensor | None = None  # [len(order), width, 1], None without pads
    order: torch.Tensor | None = None  # used pool indices when they are not lo..hi-1
    lo: int = 0
    hi: int = 0
    width: int = 0
    # The native kernel's view: rows grouped by pool index (int32 tensors, kept alive here).
    segments: tuple | None = None

    def used_rows(self, stacked: torch.Tensor) -> torch.Tensor:
        """The used adapters' slices of a pool tensor, in segment order (a view when compact)."""
        if self.order is None:
            return stacked[self.lo:self.hi]
        return stacked.index_select(0, self.order)


@dataclass
class LoraBatch:
    """How the rows of one forward pass map onto pools (rebuilt when the rows change)."""

    row_slots: tuple[int, ...]
    generation: int
    pools: list[PoolPlan] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when no row uses an adapter."""
        return not self.pools


class LoraStack:
    """Every resident adapter's weights, in one pool per rank.

    Not thread-safe: the caller serialises `install`/`clear` with forward passes.
    """

    def __init__(self, shapes: dict[str, tuple[int, list[int]]], capacity: int, *,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 kernel: str = "torch") -> None:
        """Create an empty stack.

        Args:
            shapes: ``{projection: (in_features, [size of each part])}``.
            capacity: Adapters resident at once (per pool).
            dtype: Compute dtype of the deltas.
            device: Where the tensors live.
            kernel: ``torch`` or ``native`` (`serve.runtime.native`; falls back to ``torch``
                where the kernel cannot be built, or off CPU, or for other dtypes).
        """
        self.shapes = dict(shapes)
        self.capacity = capacity
        self.dtype = dtype
        self.device = device
        self.pools: dict[int, Pool] = {}
        self.generation = 0
        self._sgmv = None
        if kernel == "native" and str(device).startswith("cpu"):
            from serve.runtime import native

            self._sgmv = native.sgmv(dtype)
        self.kernel = "native" if self._sgmv is not None else "torch"

    # -- slots ------------------------------------------------------------------------------

    def install(self, weights: AdapterWeights) -> int:
        """Copy ``weights`` into a free index of its rank's pool; return the slot."""
        return self._write(weights.rank, {key: (a.T, bts)
                                          for key, (a, bts) in weights.modules.items()})

    def _write(self, r: int, rows: dict[ModuleKey, tuple[torch.Tensor, list[torch.Tensor]]],
               ) -> int:
        """Copy pool-layout rows into a free index of the rank-``r`` pool; return the slot.

        ``rows`` is ``{key: (A^T, [B^T per part])}``; the pool and its tensors per key are
        created on first use.
        """
        import torch

        pool = self.pools.get(r)
        if pool is None:
            pool = self.pools[r] = Pool(r, self.capacity, free=list(range(self.capacity)))
        if not pool.free:
            raise RuntimeError(f"LoRA pool of rank {r} is full")
        index = pool.free.pop(0)
        for key, (at, bts) in rows.items():
            in_f, sizes = self.shapes[key[1]]
            if key not in pool.at:
                pool.at[key] = torch.zeros(pool.capacity, in_f, len(sizes) * r, dtype=self.dtype,
                                           device=self.device)
                pool.bt[key] = [torch.zeros(pool.capacity, r, size, dtype=self.dtype,
                                            device=self.device) for size in sizes]
                pool.targets[key] = set()
                pool.native.pop(key, None)
            pool.at[key][index].copy_(at)
            for dst, bt in zip(pool.bt[key], bts, strict=True):
                dst[index].copy_(bt)
            pool.targets[key].add(index)
        self.generation += 1
        return r * SLOT_BASE + index

    def clear(self, slot: int) -> None:
        """Free ``slot`` (its adapter was evicted); its rows are zeroed."""
        pool, index = self.pools[slot // SLOT_BASE], slot % SLOT_BASE
        for key, indices in pool.targets.items():
            if index in indices:
                pool.at[key][index].zero_()
                for bt in pool.bt[key]:
                    bt[index].zero_()
                indices.discard(index)
        pool.free.append(index)
        pool.free.sort()
        self.generation += 1

    def snapshot(self, slot: int) -> AdapterCopy:
        """Copies of ``slot``'s pool rows (for a host-memory tier; restored by `restore`)."""
        pool, index = self.pools[slot // SLOT_BASE], slot % SLOT_BASE
        rows = {key: (pool.at[key][index].clone(), [bt[index].clone() for bt in pool.bt[key]])
                for key, indices in pool.targets.items() if index in indices}
        return AdapterCopy(pool.rank, rows)

    def restore(self, copy: AdapterCopy) -> int:
        """Install a `snapshot` into a free index of its rank's pool; return the slot."""
        return self._write(copy.rank, copy.rows)

    def has_room(self, rank: int) -> bool:
        """True when an adapter of ``rank`` can be installed without evicting."""
        pool = self.pools.get(rank)
        return pool is None or bool(pool.free)

    def nbytes(self) -> int:
        """Bytes of the pools' tensors (allocated, touched or not)."""
        total = 0
        for pool in self.pools.values():
            for key, at in pool.at.items():
                total += at.numel() * at.element_size()
                total += sum(b.numel() * b.element_size() for b in pool.bt[key])
        return total

    # -- batches ----------------------------------------------------------------------------

    def plan(self, row_slots: list[int] | tuple[int, ...]) -> LoraBatch:
        """Build the per-pass plan for rows using ``row_slots`` (``-1``: no adapter)."""
        import torch

        row_slots = tuple(int(s) for s in row_slots)
        plan = LoraBatch(row_slots=row_slots, generation=self.generation)
        by_rank: dict[int, dict[int, list[int]]] = {}
        for row, slot in enumerate(row_slots):
            if slot >= 0:
                rank, index = divmod(slot, SLOT_BASE)
                by_rank.setdefault(rank, {}).setdefault(index, []).append(row)
        for rank, members in sorted(by_rank.items()):
            pp = PoolPlan(rank=rank, used=frozenset(members))
            if self._sgmv is not None:
                order = sorted(members)
                starts = [0]
                for index in order:
                    starts.append(starts[-1] + len(members[index]))
                pp.segments = tuple(torch.tensor(values, dtype=torch.int32) for values in (
                    order, starts, [row for index in order for row in members[index]]))
                plan.pools.append(pp)
                continue
            if len(members) == 1 and len(next(iter(members.values()))) == len(row_slots):
                pp.uniform = next(iter(members))
                plan.pools.append(pp)
                continue
            order = sorted(members)
            width = max(len(rows) for rows in members.values())
            covered = sum(len(rows) for rows in members.values())
            if covered < len(row_slots) and covered == width * len(order):
                width += 1  # rows of other pools need a zero pad to read from
            gather, pads = [], []
            scatter = [-1] * len(row_slots)
            for index in order:
                rows = members[index]
                for j, row in enumerate(rows):
                    scatter[row] = len(gather) + j
                gather += rows + [0] * (width - len(rows))
                pads += [1.0] * len(rows) + [0.0] * (width - len(rows))
            pad = pads.index(0.0) if 0.0 in pads else 0
            pp.width = width
            pp.gather = torch.tensor(gather, device=self.device)
            pp.scatter = torch.tensor([pad if s < 0 else s for s in scatter], device=self.device)
            pp.lo, pp.hi = order[0], order[-1] + 1
            if order != list(range(pp.lo, pp.hi)):
                pp.order = torch.tensor(order, device=self.device)
            if 0.0 in pads:
                pp.pad_mask = torch.tensor(pads, dtype=self.dtype,
                                           device=self.device).view(len(order), width, 1)
            plan.pools.append(pp)
        return plan

    def apply(self, key: ModuleKey, x: torch.Tensor, out: torch.Tensor, plan: LoraBatch,
              offsets: list[int]) -> None:
        """Add the LoRA delta of projection ``key`` for every row of ``x`` into ``out``.

        Args:
            key: ``(layer, projection)``.
            x: ``[rows, in]`` input of the projection.
            out: ``[rows, out]`` its output (modified in place).
            plan: From `plan` for these rows, built at the current generation.
            offsets: Column offset of each part in ``out``.
        """
        import torch

        if (self._sgmv is not None and x.dtype == out.dtype == self.dtype
                and x.stride(-1) == 1 and out.stride(-1) == 1):
            self._apply_native(key, x, out, plan, offsets)
            return
        for pp in plan.pools:
            pool = self.pools[pp.rank]
            indices = pool.targets.get(key)
            if not indices or indices.isdisjoint(pp.used):
                continue
            at, bts, r = pool.at[key], pool.bt[key], pp.rank
            if x.dtype != self.dtype:  # LoRA kept wider than the base's compute dtype
                x = x.to(self.dtype)
            if pp.uniform >= 0:
                hidden = x @ at[pp.uniform]
                for p, (bt, start) in enumerate(zip(bts, offsets, strict=True)):
                    view = out[:, start:start + bt.shape[2]]
                    if view.dtype == hidden.dtype:
                        view.addmm_(hidden[:, p * r:(p + 1) * r], bt[pp.uniform])
                    else:
                        view.add_(hidden[:, p * r:(p + 1) * r] @ bt[pp.uniform])
                continue
            segments = x.index_select(0, pp.gather).view(len(pp.used), pp.width, -1)
            hidden = torch.bmm(segments, pp.used_rows(at))
            if pp.pad_mask is not None:
                hidden.mul_(pp.pad_mask)
            for p, (bt, start) in enumerate(zip(bts, offsets, strict=True)):
                delta = torch.bmm(hidden[:, :, p * r:(p + 1) * r], pp.used_rows(bt))
                out[:, start:start + bt.shape[2]].add_(
                    delta.view(-1, bt.shape[2]).index_select(0, pp.scatter))

    def _apply_native(self, key: ModuleKey, x: torch.Tensor, out: torch.Tensor,
                      plan: LoraBatch, offsets: list[int]) -> None:
        """`apply` by the native kernel: one call per pool the rows use, on torch's threads."""
        import torch

        for pp in plan.pools:
            pool = self.pools[pp.rank]
            indices = pool.targets.get(key)
            if not indices or indices.isdisjoint(pp.used):
                continue
            args = pool.native.get(key)
            if args is None:
                args = pool.native[key] = _native_args(pool, key, offsets)
            slots, starts, rows = pp.segments
            self._sgmv(slots.numel(), slots.data_ptr(), starts.data_ptr(), rows.data_ptr(),
                       args[0], x.data_ptr(), x.stride(0), *args[1:8], out.data_ptr(),
                       out.stride(0), torch.get_num_threads())


def _native_args(pool: Pool, key: ModuleKey, offsets: list[int]) -> tuple:
    """The native kernel's constant arguments for ``key`` in ``pool`` (arrays kept alive)."""
    import ctypes

    at, bts = pool.at[key], pool.bt[key]
    pointers = (ctypes.c_void_p * len(bts))(*[bt.data_ptr() for bt in bts])
    sizes = (ctypes.c_int64 * len(bts))(*[bt.shape[2] for bt in bts])
    starts = (ctypes.c_int64 * len(bts))(*offsets)
    return (at.shape[1], at.data_ptr(), at.shape[2], pool.rank, len(bts),
            ctypes.addressof(pointers), ctypes.addressof(sizes), ctypes.addressof(starts),
            (pointers, sizes, starts, at, bts))


def reference_delta(x: torch.Tensor, row_adapters: list[AdapterWeights | None], key: ModuleKey,
                    out_features: int, offsets: list[int]) -> torch.Tensor:
    """Per-row LoRA delta of a fused projection, one row at a time (the unit tests' reference).

    Args:
        x: ``[rows, in]``.
        row_adapters: The adapter of each row, or None.
        key: ``(layer, projection)``.
        out_features: Width of the output.
        offsets: Column offset of each part.
    """
    import torch

    out = torch.zeros(x.shape[0], out_features, dtype=x.dtype)
    for i, adapter in enumerate(row_adapters):
        if adapter is None or key not in adapter.modules:
            continue
        a, bts = adapter.modules[key]
        r = adapter.rank
        hidden = x[i:i + 1] @ a.T
        for p, (bt, start) in enumerate(zip(bts, offsets, strict=True)):
            out[i, start:start + bt.shape[1]] += (hidden[:, p * r:(p + 1) * r] @ bt)[0]
    return out
