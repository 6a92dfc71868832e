"""The one thing every view renders: the state of a run after its last recorded step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamspec.errors import StreamspecError
from streamspec.layout import RunLayout

__all__ = ["Snapshot"]


def _frozen_copy(name: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    array = np.array(value, dtype=np.float32, copy=True)
    if array.shape != shape:
        raise StreamspecError.build(
            f"{name} of shape {shape} (from the run layout)",
            f"{array.shape}",
            "build the snapshot from arrays of this run's layout",
        )
    # The monitor keeps writing its own buffers while a view renders on another thread.
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class Snapshot:
    """What a live view shows after a recorded step; built by the monitor or read from an archive.

    The live table during training and ``streamspec view RUN`` in another terminal render this
    same type, so it carries numbers only, no training objects. The arrays are copied and made
    read-only on construction, so a view thread can never see a half-updated step.

    Attributes:
        layout: The run's layers, groups and rank.
        step: Index of the last recorded step; -1 before the first.
        epoch: Current epoch.
        steps_in_epoch: Steps recorded so far in this epoch.
        sigma: Singular values of the last recorded step, float32
            ``[layer, kind, group, rank]``; NaN where unknown.
        welch_t: Welch t of the epoch so far, float32 ``[layer, kind, pair, rank]``; NaN where
            unknown.
        store: Where the archive is, for display; None when nothing is stored.
        elapsed_s: Seconds since the run started.
    """

    layout: RunLayout
    step: int
    epoch: int
    steps_in_epoch: int
    sigma: np.ndarray
    welch_t: np.ndarray
    store: str | None = None
    elapsed_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", _frozen_copy("sigma", self.sigma, self.layout.step_shape))
        object.__setattr__(
            self, "welch_t", _frozen_copy("welch_t", self.welch_t, self.layout.pair_shape)
        )

    @classmethod
    def empty(cls, layout: RunLayout, *, store: str | None = None) -> Snapshot:
        """A snapshot before any step: step -1, all values NaN."""
        return cls(
            layout=layout,
            step=-1,
            epoch=0,
            steps_in_epoch=0,
            sigma=np.full(layout.step_shape, np.nan, np.float32),
            welch_t=np.full(layout.pair_shape, np.nan, np.float32),
            store=store,
        )
