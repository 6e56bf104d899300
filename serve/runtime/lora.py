"""Batched multi-LoRA: stacked adapter weights and the mixed-batch delta, in plain torch.

Every resident adapter owns a *slot*. For each targeted base module (``layer``, ``leaf``) the
stack keeps ``a[slot] = A`` (``[rank, in]``) and ``bt[slot] = (B * scaling).T`` (``[rank, out]``),
ranks padded with zeros to the largest resident rank (zeros add exactly nothing). A forward pass
gives each row (one token of one sequence) a slot, or ``-1`` for the bare base, and adds

    delta[i] = x[i] @ a[slot_i].T @ bt[slot_i]

to the base module's output for every row at once. Ways to compute it (``kernel``):

- ``masked``: the slots used by the batch form one range ``lo:hi``; ``x`` is multiplied by all of
  their A's at once (one matmul over ``(hi - lo) * rank`` columns), the columns that belong to
  other rows' adapters are zeroed by a 0/1 mask, and one ``addmm`` with the stacked B's adds the
  delta: three ops per module whatever the number of adapters, but ``u`` adapters cost ``u``
  times the minimal arithmetic.
- ``sgmv``: rows grouped into one equal-width segment per used adapter (pad rows are zero and add
  exactly zero), then ``bmm`` with the used adapters' A's, ``bmm`` with their B's and one
  ``index_add_`` back: the minimal arithmetic in five ops (Punica's SGMV written as dense torch
  ops, the segments padded instead of ragged).
- ``grouped``: rows grouped by adapter, two small matmuls and an ``index_add_`` per adapter.
- ``bmm``: per-row gathered A's and B's (``a[idx]``), then ``torch.bmm`` (S-LoRA's gather-BMM
  baseline); copies rank x (in + out) weights per row per module.
- ``auto`` (default): ``masked`` up to `AUTO_MASKED_MAX` adapters in the batch, ``sgmv`` above.

Either way each used adapter's weights are read once per pass, so a mixed batch costs the base
plus the used adapters' weight traffic. Measured here (CPU ms per module, 16 rows, rank 16,
median of 30; 2 busy cores): 2 adapters masked 0.16 / sgmv 0.23 / grouped 0.43 / bmm 0.39;
8 adapters masked 0.46 / sgmv 0.37 / grouped 1.76 / bmm 0.55; 16 adapters masked 0.63 /
sgmv 0.34 / grouped 1.32 / bmm 0.45. `bench/serve.py` compares them on the whole model.

Where the job ends: this module holds tensors and does arithmetic. Reading adapter files is
`serve.runtime.adapter_files`; which adapter owns which slot is `serve.runtime.adapter_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

LoraKernel = Literal["auto", "sgmv", "masked", "grouped", "bmm"]
LORA_KERNELS: tuple[str, ...] = ("auto", "sgmv", "masked", "grouped", "bmm")
# ``auto`` uses ``masked`` up to this many adapters in a batch, ``sgmv`` above (measured).
AUTO_MASKED_MAX = 4
ModuleKey = tuple[int, str]


@dataclass
class AdapterWeights:
    """One adapter's LoRA tensors, ready to install (scaling already folded into ``bt``).

    Attributes:
        modules: ``{(layer, leaf): (a [r, in], bt [r, out])}``.
        rank: Largest rank over the modules.
    """

    modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]
    rank: int

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (unpadded)."""
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.modules.values())


@dataclass
class LoraBatch:
    """How the rows of one forward pass map onto stack slots (rebuilt when the rows change).

    Attributes:
        row_slots: Slot of each row, ``-1`` for the bare base.
        generation: The stack generation this plan was built for.
        lo: First slot of the used range.
        hi: One past the last slot of the used range.
        uniform: All rows use the same slot (no mask needed).
        mask: ``[rows, (hi - lo) * rank]`` 0/1 (``masked`` kernel).
        groups: ``[(slot, row index tensor)]`` (``grouped`` kernel).
        gather: ``[used * width]`` row of each segment position, pads -> row 0 (``sgmv``).
        pad_mask: ``[used, width, 1]`` 1 for real rows, 0 for pads; None without pads.
        slot_index: Used slots in segment order, or None when they are ``lo..hi-1``.
        rows: Rows that have an adapter (``bmm`` kernel).
        slots: Slot of each of those rows (``bmm`` kernel).
        used: Slots used by the batch.
    """

    row_slots: tuple[int, ...]
    generation: int
    lo: int = 0
    hi: int = 0
    uniform: bool = False
    mask: torch.Tensor | None = None
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    rows: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    used: frozenset[int] = frozenset()
    gather: torch.Tensor | None = None
    pad_mask: torch.Tensor | None = None
    slot_index: torch.Tensor | None = None
    width: int = 0

    @property
    def empty(self) -> bool:
        """True when no row uses an adapter."""
        return not self.used


class LoraStack:
    """Stacked, rank-padded LoRA weights of every resident adapter, one slot each.

    Not thread-safe: the caller serialises `install`/`clear` with forward passes.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        num_slots: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        kernel: LoraKernel = "auto",
    ) -> None:
        """Create an empty stack.

        Args:
            shapes: ``{leaf: (in_features, out_features)}`` of the targetable modules.
            num_slots: Adapters resident at once.
            dtype: Compute dtype of the deltas.
            device: Where the tensors live.
            kernel: Which mixed-batch method `apply` uses.
        """
        self.shapes = dict(shapes)
        self.num_slots = num_slots
        self.dtype = dtype
        self.device = device
        self.kernel: LoraKernel = kernel
        self.rank = 0
        self.generation = 0
        self.a: dict[ModuleKey, torch.Tensor] = {}
        self.bt: dict[ModuleKey, torch.Tensor] = {}
        self.targets: dict[ModuleKey, set[int]] = {}

    # -- slots ------------------------------------------------------------------------------

    def install(self, slot: int, weights: AdapterWeights) -> None:
        """Write ``weights`` into ``slot`` (growing the padded rank if needed)."""
        import torch

        if weights.rank > self.rank:
            self._grow_rank(weights.rank)
        self.clear(slot)
        for key, (a, bt) in weights.modules.items():
            if key not in self.a:
                in_f, out_f = self.shapes[key[1]]
                self.a[key] = torch.zeros(self.num_slots, self.rank, in_f,
                                          dtype=self.dtype, device=self.device)
                self.bt[key] = torch.zeros(self.num_slots, self.rank, out_f,
                                           dtype=self.dtype, device=self.device)
                self.targets[key] = set()
            r = a.shape[0]
            self.a[key][slot, :r].copy_(a)
            self.bt[key][slot, :r].copy_(bt)
            self.targets[key].add(slot)
        self.generation += 1

    def clear(self, slot: int) -> None:
        """Zero ``slot`` everywhere (its adapter was evicted)."""
        for key, slots in self.targets.items():
            if slot in slots:
                self.a[key][slot].zero_()
                self.bt[key][slot].zero_()
                slots.discard(slot)
        self.generation += 1

    def _grow_rank(self, rank: int) -> None:
        import torch

        for store in (self.a, self.bt):
            for key, old in store.items():
                new = torch.zeros(old.shape[0], rank, old.shape[2], dtype=old.dtype,
                                  device=old.device)
                new[:, : old.shape[1]].copy_(old)
                store[key] = new
        self.rank = rank

    def nbytes(self) -> int:
        """Bytes held by the stacked tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.bt.values()))

    # -- batches ----------------------------------------------------------------------------

    def plan(self, row_slots: list[int] | tuple[int, ...]) -> LoraBatch:
        """Build the per-pass plan for rows using ``row_slots`` (``-1``: no adapter)."""
        import torch

        row_slots = tuple(int(s) for s in row_slots)
        used = frozenset(s for s in row_slots if s >= 0)
        plan = LoraBatch(row_slots=row_slots, generation=self.generation, used=used)
        if not used:
            return plan
        plan.lo, plan.hi = min(used), max(used) + 1
        plan.uniform = len(used) == 1 and all(s >= 0 for s in row_slots)
        kernel = self.kernel
        if kernel == "auto":
            kernel = "masked" if len(used) <= AUTO_MASKED_MAX else "sgmv"
        if kernel == "sgmv" and len(used) == 1:
            kernel = "masked"  # one adapter (plus base rows): one slot, no wasted columns
        if kernel == "sgmv" and not plan.uniform:
            self._plan_segments(plan)
        elif kernel == "masked" and not plan.uniform:
            width = (plan.hi - plan.lo) * self.rank
            mask = torch.zeros(len(row_slots), width, dtype=self.dtype)
            for row, slot in enumerate(row_slots):
                if slot >= 0:
                    start = (slot - plan.lo) * self.rank
                    mask[row, start:start + self.rank] = 1
            plan.mask = mask.to(self.device)
        elif kernel == "grouped":
            for slot in sorted(used):
                rows = [i for i, s in enumerate(row_slots) if s == slot]
                plan.groups.append((slot, torch.tensor(rows, device=self.device)))
        elif kernel == "bmm":
            rows = [i for i, s in enumerate(row_slots) if s >= 0]
            plan.rows = torch.tensor(rows, device=self.device)
            plan.slots = torch.tensor([row_slots[i] for i in rows], device=self.device)
        return plan

    def _plan_segments(self, plan: LoraBatch) -> None:
        """Rows grouped into equal-width segments, one per used slot (pads add exact zeros)."""
        import torch

        order = sorted(plan.used)
        members = {slot: [i for i, s in enumerate(plan.row_slots) if s == slot] for slot in order}
        width = max(len(rows) for rows in members.values())
        gather, pads = [], []
        for slot in order:
            rows = members[slot]
            gather += rows + [0] * (width - len(rows))
            pads += [1.0] * len(rows) + [0.0] * (width - len(rows))
        plan.width = width
        plan.gather = torch.tensor(gather, device=self.device)
        if 0.0 in pads:
            plan.pad_mask = torch.tensor(pads, dtype=self.dtype,
                                         device=self.device).view(len(order), width, 1)
        if order != list(range(plan.lo, plan.hi)):
            plan.slot_index = torch.tensor(order, device=self.device)

    def targeted(self, key: ModuleKey, plan: LoraBatch) -> bool:
        """True when some adapter used by ``plan`` targets module ``key``."""
        slots = self.targets.get(key)
        return bool(slots) and not slots.isdisjoint(plan.used)

    def apply(self, key: ModuleKey, x: torch.Tensor, out: torch.Tensor, plan: LoraBatch) -> None:
        """Add the LoRA delta of module ``key`` for every row of ``x`` into ``out`` in place.

        Args:
            key: ``(layer, leaf)``.
            x: ``[rows, in]`` input of the base module.
            out: ``[rows, out]`` output of the base module (modified).
            plan: From `plan` for these rows, built at the current generation.
        """
        if plan.empty or not self.targeted(key, plan):
            return
        a, bt = self.a[key], self.bt[key]
        if plan.uniform:
            slot = plan.lo
            out.addmm_(x @ a[slot].T, bt[slot])
        elif plan.gather is not None:  # sgmv
            import torch

            if plan.slot_index is None:
                a_used, bt_used = a[plan.lo:plan.hi], bt[plan.lo:plan.hi]
            else:
                a_used = a.index_select(0, plan.slot_index)
                bt_used = bt.index_select(0, plan.slot_index)
            segments = x.index_select(0, plan.gather).view(a_used.shape[0], plan.width, -1)
            hidden = torch.bmm(segments, a_used.transpose(1, 2))
            if plan.pad_mask is not None:
                hidden.mul_(plan.pad_mask)
            delta = torch.bmm(hidden, bt_used)
            out.index_add_(0, plan.gather, delta.view(-1, delta.shape[-1]))
        elif plan.mask is not None:  # masked
            in_f, out_f = a.shape[2], bt.shape[2]
            a_used = a[plan.lo:plan.hi].reshape(-1, in_f)
            bt_used = bt[plan.lo:plan.hi].reshape(-1, out_f)
            hidden = x @ a_used.T
            hidden.mul_(plan.mask)
            out.addmm_(hidden, bt_used)
        elif plan.groups:  # grouped
            for slot, rows in plan.groups:
                part = x.index_select(0, rows)
                out.index_add_(0, rows, (part @ a[slot].T) @ bt[slot])
        else:
            import torch

            part = x.index_select(0, plan.rows).unsqueeze(1)
            hidden = torch.bmm(part, a.index_select(0, plan.slots).transpose(1, 2))
            delta = torch.bmm(hidden, bt.index_select(0, plan.slots)).squeeze(1)
            out.index_add_(0, plan.rows, delta)


def reference_delta(
    x: torch.Tensor, row_adapters: list[AdapterWeights | None], key: ModuleKey, out_features: int
) -> torch.Tensor:
    """Per-row LoRA delta computed one row at a time (the unit tests' reference).

    Args:
        x: ``[rows, in]``.
        row_adapters: The adapter of each row, or None.
        key: Module ``(layer, leaf)``.
        out_features: Width of the output.
    """
    import torch

    rows = []
    for i, adapter in enumerate(row_adapters):
        if adapter is None or key not in adapter.modules:
            rows.append(torch.zeros(out_features, dtype=x.dtype))
            continue
        a, bt = adapter.modules[key]
        rows.append((x[i:i + 1] @ a.T @ bt)[0])
    return torch.stack(rows)
