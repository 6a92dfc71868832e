"""Activation checkpointing (reentrant or not) records each step once, with the same spectra."""

from __future__ import annotations

import warnings

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


class ConvTwice(nn.Module):
    """One convolution applied twice inside one checkpointed segment (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(3, 3, 3, padding=1)
        self.h = nn.Linear(30, 2)

    def forward(self, x: torch.Tensor, mode: str | None) -> torch.Tensor:
        def twice(t: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.c(torch.tanh(self.c(t))))

        y = twice(x) if mode is None else checkpoint(twice, x, use_reentrant=mode == "reentrant")
        return self.h(y.flatten(1))


class ProjectedLSTM(nn.Module):
    """An LSTM with a projection (its ``weight_hr`` is captured once per time step) inside a
    checkpointed segment."""

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Linear(4, 4)
        self.r = nn.LSTM(4, 8, proj_size=3, batch_first=True)
        self.h = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, mode: str | None) -> torch.Tensor:
        def run(t: torch.Tensor) -> torch.Tensor:
            return self.r(t)[0]

        t = self.e(x)
        y = run(t) if mode is None else checkpoint(run, t, use_reentrant=mode == "reentrant")
        return self.h(y[:, -1])


def record_tied(make, shape, mode: str | None):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = make()
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with streamspec.watch(model, ["a", "b"], rank=3, live=False, tied=True) as mon:
            for _ in range(3):
                mon.label(torch.tensor([0, 1] * 4))
                x = torch.randn(8, *shape, generator=gen).requires_grad_()
                model(x, mode).pow(2).sum().backward()
            ds = mon.to_xarray()
    assert not [w for w in caught if "streamspec" in str(w.message)], [
        str(w.message) for w in caught
    ]
    return ds


@pytest.mark.parametrize(
    "make,shape", [(ConvTwice, (3, 10)), (ProjectedLSTM, (5, 4))], ids=["conv-twice", "lstm-proj"]
)
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_a_layer_called_several_times_in_one_segment_records_as_without(make, shape, mode) -> None:
    """A layer called several times inside one checkpointed segment: its recomputed calls count
    together once a gradient reaches one of them (reentrant), or never (non-reentrant: the first
    forward's calls get the gradients), so it folds once, as without checkpointing; its step and
    tying spectra are those of the plain run, without a warning (counted one at a time, the
    first call folded alone and the tying spectrum of the two parts could not be merged: the
    whole module NaN)."""
    plain = record_tied(make, shape, None)
    got = record_tied(make, shape, mode)
    for var in ("sigma", "sigma_tied"):
        assert np.isfinite(plain[var].values[:, :, ..., 0]).any()
        np.testing.assert_allclose(got[var].values, plain[var].values, rtol=1e-5)


def test_a_layer_called_twice_in_a_reentrant_segment_folds_once_in_its_backward(
    monkeypatch,
) -> None:
    """Both calls' rows are folded together when the segment's backward delivers their
    gradients, not one now and one at the step's end."""
    from streamspec import monitor as monitor_module

    folds: list[tuple[str, int, int]] = []
    real = monitor_module.Monitor._fold

    def fold(self, index):  # type: ignore[no-untyped-def]
        state = self._state[index]
        folds.append((self.sites[index].name, len(state.pending), state.calls))
        return real(self, index)

    monkeypatch.setattr(monitor_module.Monitor, "_fold", fold)
    record_tied(ConvTwice, (3, 10), "reentrant")
    assert [f for f in folds if f[0] == "c.weight"] == [("c.weight", 2, 2)] * 3, folds
