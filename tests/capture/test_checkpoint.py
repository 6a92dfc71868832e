"""Activation checkpointing (reentrant or not) records each step once, with the same spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import streamspec


class Net(nn.Module):
    def __init__(self, checkpointed: str) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 2)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor, mode: str | None) -> torch.Tensor:
        def run(name: str, fn, t):  # type: ignore[no-untyped-def]
            if mode is None or name != self.checkpointed:
                return fn(t)
            return checkpoint(fn, t, use_reentrant=(mode == "reentrant"))

        h = torch.tanh(self.a(x))
        h = run("b", lambda t: torch.tanh(self.b(t)), h)
        return run("c", self.c, h)


def record(mode: str | None, checkpointed: str) -> np.ndarray:
    torch.manual_seed(0)
    model = Net(checkpointed)
    gen = torch.Generator().manual_seed(0)
    with streamspec.watch(model, ["a", "b"], rank=3, live=False) as mon:
        for _ in range(3):
            mon.label(torch.tensor([0, 1, 0, 1, -1]))
            model(torch.randn(5, 4, generator=gen), mode).pow(2).sum().backward()
        assert mon.step == 3
        return mon.to_xarray()["sigma"].values


@pytest.mark.parametrize("checkpointed", ["b", "c"], ids=["middle", "last"])
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpointing_records_each_step_once(mode: str, checkpointed: str) -> None:
    plain = record(None, checkpointed)
    got = record(mode, checkpointed)
    assert got.shape == plain.shape == (3, 3, 3, 2, 3)
    np.testing.assert_allclose(got, plain, rtol=1e-5)
