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


class RecurrentNet(nn.Module):
    """A recurrent module (watched through its stepwise twin) inside a checkpointed region, whose
    input requires a gradient (reentrant checkpointing gives the region's weights none
    otherwise)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.rnn = getattr(nn, kind)(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, mode: str | None) -> torch.Tensor:
        def run(t: torch.Tensor) -> torch.Tensor:
            return self.rnn(t)[0]

        x = self.embed(x)
        h = run(x) if mode is None else checkpoint(run, x, use_reentrant=(mode == "reentrant"))
        return self.head(h[:, -1])


def record_recurrent(kind: str, mode: str | None) -> np.ndarray:
    torch.manual_seed(0)
    model = RecurrentNet(kind)
    gen = torch.Generator().manual_seed(0)
    with streamspec.watch(model, ["a", "b"], rank=3, live=False) as mon:
        for _ in range(3):
            mon.label(torch.tensor([0, 1, 0, 1, -1, 0, 1, 1]))
            model(torch.randn(8, 6, 4, generator=gen), mode).pow(2).sum().backward()
        assert mon.step == 3
        return mon.to_xarray()["sigma"].values


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpointed_recurrent_twins_record_as_without(mode: str, kind: str) -> None:
    """Reentrant checkpointing runs the region's forward under ``no_grad`` (the twin's fused
    kernel, nothing captured) and again inside the backward (stepwise, captured there): the
    records equal those of the same run without checkpointing."""
    plain = record_recurrent(kind, None)
    got = record_recurrent(kind, mode)
    assert got.shape == plain.shape == (3, 4, 3, 2, 3)  # embed, weight_ih, weight_hh, head
    assert np.isfinite(plain[..., 0]).all()  # every layer recorded (σ₃ of the 2-output head: NaN)
    np.testing.assert_allclose(got, plain, rtol=1e-5)
