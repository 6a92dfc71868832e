"""Shared fixtures: a real (small) training run on scikit-learn's digits, watched and referenced."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import streamspec
from streamspec.testing.reference import ExactRecorder


@dataclass
class DigitsRun:
    ds: object  # xarray.Dataset of the archive
    recorder: ExactRecorder
    epoch_steps: list[list[int]]  # recorder step indices of each epoch
    model: nn.Module


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def run_digits(
    store: object = None,
    *,
    epochs: int = 2,
    batch_size: int = 64,
    groups: tuple[str, ...] = ("0", "1", "2", "3"),
    label_fn=None,  # (y) -> group labels
    hidden: int = 32,
    rank: int = 8,
    n_samples: int | None = 640,
    record: bool = True,
    **watch_kwargs: object,
) -> DigitsRun:
    torch.manual_seed(0)
    x, y = digits_data()
    if n_samples is not None:
        x, y = x[:n_samples], y[:n_samples]
    g = torch.where(y < len(groups), y, torch.full_like(y, -1)) if label_fn is None else label_fn(y)
    model = nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = ExactRecorder(model) if record else None
    watch_kwargs.setdefault("live", False)
    mon = streamspec.watch(model, list(groups), rank=rank, store=store, **watch_kwargs)
    epoch_steps: list[list[int]] = []
    gen = torch.Generator().manual_seed(1)
    step = 0
    with mon:
        for _ in range(epochs):
            steps = []
            perm = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                idx = perm[start : start + batch_size]
                mon.label(g[idx])
                if rec is not None:
                    rec.label(g[idx])
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps.append(step)
                step += 1
            epoch_steps.append(steps)
            mon.end_epoch()
        ds = mon.to_xarray()
    if rec is not None:
        rec.remove()
    return DigitsRun(ds=ds, recorder=rec, epoch_steps=epoch_steps, model=model)  # type: ignore[arg-type]


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
