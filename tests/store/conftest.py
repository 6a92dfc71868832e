"""Fixtures shared by the store tests: a small layout and rows whose values encode their step."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from streamspec.layout import RunLayout

Row = dict[str, np.ndarray]


@pytest.fixture
def layout() -> RunLayout:
    return RunLayout(
        layers=("encoder.fc1", "encoder.fc2"),
        groups=("cats", "dogs", "ünïcode"),
        rank=4,
        normalize="mean",
        every=2,
        model="TinyMLP",
    )


@pytest.fixture
def step_row(layout: RunLayout) -> Callable[[int], Row]:
    """One step's row: ``sigma`` = step + random in [0, 1), ``count`` = step in every group."""

    def make(step: int) -> Row:
        rng = np.random.default_rng(step)
        sigma = (step + rng.random(layout.step_shape)).astype(np.float32)
        count = np.full(len(layout.groups), step, dtype=np.int64)
        return {"sigma": sigma, "count": count}

    return make


@pytest.fixture
def epoch_row(layout: RunLayout) -> Callable[[int], Row]:
    """One epoch's row, with p-values far below float32's range to check they survive."""

    def make(epoch: int) -> Row:
        rng = np.random.default_rng(10_000 + epoch)
        return {
            "sigma_epoch": rng.random(layout.step_shape).astype(np.float32),
            "welch_t": rng.normal(size=layout.pair_shape),
            "welch_p": rng.random(layout.pair_shape) * 1e-60,
        }

    return make
