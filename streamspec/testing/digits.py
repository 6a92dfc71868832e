"""A real, small training run for tests and benchmarks: an MLP on scikit-learn's digits, watched
by streamspec and, optionally, by the exact reference recorder at the same time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import streamspec
from streamspec.testing.reference import ExactRecorder


@dataclass
class DigitsRun:
    ds: Any  # the run's xarray.Dataset
    recorder: ExactRecorder | None
    epoch_steps: list[list[int]]  # step indices of each epoch
    model: nn.Module


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1] and their classes (bundled with scikit-learn: no download)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def run_digits(
    store: object = None,
    *,
    epochs: int = 2,
    batch_size: int = 64,
    groups: tuple[str, ...] | list[str] = ("0", "1", "2", "3"),
    label_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    hidden: int = 32,
    rank: int = 8,
    n_samples: int | None = 640,
    record: bool = True,
    optimizer: str = "sgd",
    shuffle_seed: int = 1,
    **watch_kwargs: Any,
) -> DigitsRun:
    """Train a 64-h-h-10 MLP classifier for ``epochs`` and return its archive as a dataset.

    Groups default to the digits ``0..len(groups)-1`` (others: -1); ``label_fn(y)`` overrides.
    ``record`` also keeps every step's exact matrices (:class:`ExactRecorder`).
    """
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
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    rec = ExactRecorder(model) if record else None
    watch_kwargs.setdefault("live", False)
    mon = streamspec.watch(model, list(groups), rank=rank, store=store, **watch_kwargs)
    epoch_steps: list[list[int]] = []
    gen = torch.Generator().manual_seed(shuffle_seed)
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
    return DigitsRun(ds=ds, recorder=rec, epoch_steps=epoch_steps, model=model)
