"""The shape of a run: layers, groups, rank and the names every part of streamspec shares.

The archive, the statistics, the live view and the reader all index arrays the same way:
``sigma[layer, kind, group, rank]`` per step, ``[layer, kind, pair, rank]`` for pairwise tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

KINDS: tuple[str, ...] = ("activation", "adjoint", "gradient")
NORMALIZE_CHOICES: tuple[str, ...] = ("mean", "sum")


def pair_labels(groups: tuple[str, ...]) -> tuple[str, ...]:
    """Every unordered pair of groups in ``groups`` order, labelled ``"<a> vs <b>"``."""
    return tuple(f"{a} vs {b}" for a, b in combinations(groups, 2))


def pair_indices(n_groups: int) -> tuple[tuple[int, int], ...]:
    """Index pairs ``(i, j)``, ``i < j``, in the order of :func:`pair_labels`."""
    return tuple(combinations(range(n_groups), 2))


@dataclass(frozen=True)
class RunLayout:
    """What a run records: fixed for the life of an archive (a resumed run must match it)."""

    layers: tuple[str, ...]
    groups: tuple[str, ...]
    rank: int
    normalize: str = "mean"
    every: int = 1
    model: str = ""
    extras: tuple[str, ...] = ()  # optional archive variables this run records, e.g. "sigma_tied"

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS

    @property
    def pairs(self) -> tuple[str, ...]:
        return pair_labels(self.groups)

    @property
    def step_shape(self) -> tuple[int, int, int, int]:
        """Shape of one step's ``sigma``: ``[layer, kind, group, rank]``."""
        return (len(self.layers), len(KINDS), len(self.groups), self.rank)

    @property
    def pair_shape(self) -> tuple[int, int, int, int]:
        """Shape of one epoch's ``welch_t``/``welch_p``: ``[layer, kind, pair, rank]``."""
        return (len(self.layers), len(KINDS), len(self.pairs), self.rank)
