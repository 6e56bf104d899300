"""Deterministic train/validation/test split over groups of near-duplicate rows.

Groups (from `train.data.dedup`) are shuffled with ``random.Random(seed)`` and dealt out: a group
goes to test while test is short of its target and the group fits, then to validation likewise,
otherwise to train. A group is never divided, so no validation or test row has a near twin in
train. Targets are ``round(n * fraction)``; with 3 or more groups, validation and test each get at
least one row (the smallest train group is moved there if the deal left one empty). Rows keep
their file order inside each split. The same rows, fractions and seed always give the same split.

Where the job ends: the split sees only group sizes and indices, never row contents.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from hub.errors import InvalidInput
from train.data.report import SPLIT_NAMES


def check_fractions(splits: Sequence[float]) -> tuple[float, float, float]:
    """Validate train/validation/test fractions.

    Raises:
        InvalidInput: Not three non-negative numbers summing to 1 with a positive train share.
    """
    values = tuple(float(s) for s in splits)
    if (
        len(values) != 3
        or any(v < 0 or math.isnan(v) for v in values)
        or values[0] <= 0
        or abs(sum(values) - 1.0) > 1e-6
    ):
        raise InvalidInput(
            f"Invalid split fractions {list(splits)!r}",
            fix="Give three fractions train, validation, test that sum to 1, e.g. 0.8 0.1 0.1.",
            param="splits",
        )
    return values  # type: ignore[return-value]


def split_groups(
    groups: list[list[int]],
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> tuple[dict[str, list[int]], list[str]]:
    """Assign whole groups of row indices to train, validation and test.

    Args:
        groups: Row-index groups that must stay together, in file order.
        seed: Shuffle seed.
        fractions: Train, validation and test fractions (sum 1).

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}`` sorted row indices, and notes
        for the report when a split could not get its share.
    """
    _, val_frac, test_frac = check_fractions(fractions)
    total = sum(len(g) for g in groups)
    order = sorted(groups, key=lambda g: g[0])
    random.Random(seed).shuffle(order)
    targets = {"validation": round(total * val_frac), "test": round(total * test_frac)}
    enough_groups = len(order) >= 3
    for name, frac in (("validation", val_frac), ("test", test_frac)):
        if enough_groups and frac > 0:
            targets[name] = max(1, targets[name])
    chosen: dict[str, list[list[int]]] = {name: [] for name in SPLIT_NAMES}
    counts = dict.fromkeys(SPLIT_NAMES, 0)
    for group in order:
        for name in ("test", "validation"):
            if counts[name] + len(group) <= targets[name]:
                break
        else:
            name = "train"
        chosen[name].append(group)
        counts[name] += len(group)
    notes = []
    frac_of = {"validation": val_frac, "test": test_frac}
    for name in ("test", "validation"):
        if counts[name] == 0 and targets[name] > 0:
            movable = [g for g in chosen["train"] if len(chosen["train"]) > 1]
            if movable:
                smallest = min(movable, key=len)
                chosen["train"].remove(smallest)
                chosen[name].append(smallest)
                counts[name] += len(smallest)
                counts["train"] -= len(smallest)
        if counts[name] == 0 and frac_of[name] > 0:
            notes.append(f"{name} split is empty: fewer than 3 groups of distinct rows to split")
        elif counts[name] < targets[name]:
            notes.append(
                f"{name} split has {counts[name]} rows, below its target {targets[name]}: "
                "near-duplicate groups are kept whole"
            )
    split = {name: sorted(i for g in chosen[name] for i in g) for name in SPLIT_NAMES}
    return split, notes
