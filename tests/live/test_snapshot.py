"""The snapshot every view renders: validated, copied, read-only."""

from __future__ import annotations

import numpy as np
import pytest

from streamspec.errors import StreamspecError
from streamspec.layout import RunLayout
from streamspec.live import Snapshot

LAYOUT = RunLayout(layers=("fc1.weight", "fc2.weight"), groups=("HC", "SZ", "BP"), rank=2)


def test_arrays_are_copied_and_read_only():
    sigma = np.ones(LAYOUT.step_shape, np.float32)
    welch_t = np.zeros(LAYOUT.pair_shape)
    snap = Snapshot(LAYOUT, 4, 0, 5, sigma, welch_t, "runs/a.zarr", 1.5)
    sigma[:] = 7.0  # the monitor reuses its buffers for the next step
    assert (snap.sigma == 1.0).all()
    assert snap.welch_t.dtype == np.float32
    with pytest.raises(ValueError, match="read-only"):
        snap.sigma[0, 0, 0, 0] = 2.0


def test_shapes_must_match_the_layout():
    with pytest.raises(StreamspecError, match=r"sigma of shape \(2, 3, 3, 2\)"):
        Snapshot(LAYOUT, 0, 0, 1, np.ones((2, 3, 2, 2)), np.zeros(LAYOUT.pair_shape))
    with pytest.raises(StreamspecError, match="welch_t"):
        Snapshot(LAYOUT, 0, 0, 1, np.ones(LAYOUT.step_shape), np.zeros((2, 3, 1, 2)))


def test_empty_snapshot():
    snap = Snapshot.empty(LAYOUT, store="runs/a.zarr")
    assert snap.step == -1 and snap.steps_in_epoch == 0
    assert np.isnan(snap.sigma).all() and np.isnan(snap.welch_t).all()
    assert snap.welch_t.shape == (2, 3, 3, 2)
