"""Shared fixtures: a real (small) training run on scikit-learn's digits, watched and referenced."""

from __future__ import annotations

import numpy as np
import pytest

from streamspec.testing.digits import DigitsRun, digits_data, run_digits

__all__ = ["DigitsRun", "digits_data", "run_digits", "relative_errors"]


def relative_errors(got: np.ndarray, exact: np.ndarray, floor: float = 1e-4) -> np.ndarray:
    """Relative errors over values above ``floor``·σ₁ of their spectrum (last axis = rank)."""
    errs = []
    for g, e in zip(
        got.reshape(-1, got.shape[-1]), exact.reshape(-1, exact.shape[-1]), strict=True
    ):
        if not np.isfinite(e[0]):
            assert np.all(np.isnan(g)), (g, e)
            continue
        keep = np.isfinite(e) & (e > floor * e[0])
        assert np.all(np.isfinite(g[keep])), (g, e)
        assert np.all(np.isnan(g[~np.isfinite(e)])), (g, e)  # NaN beyond the rank bound
        errs.append(np.abs(g[keep] - e[keep]) / e[keep])
    return np.concatenate(errs)


@pytest.fixture(scope="session")
def digits_default() -> DigitsRun:
    """Digits, groups 0–3, batch 64, default routes (the example's configuration)."""
    return run_digits()
