"""In-place ops on a watched layer's output (``nn.ReLU(inplace=True)``, ``x += residual``) record
the same spectra as their out-of-place forms.

``nn.Linear`` on input of 3 or more dims returns a view of its 2-D product; an in-place op on a
view replaces the view's autograd node, and a gradient hook on that node never fired: the layer
was silently unrecorded (NaN) at every step.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import streamspec


class TwoLinear(nn.Module):
    """Two watched Linears, ``a`` (8 → ``mid``) then ``b`` (``mid`` → ``out``)."""

    def __init__(self, mid: int = 8, out: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(8, mid)
        self.b = nn.Linear(mid, out)


class Sequence3d(TwoLinear):
    """Linear on ``[B, T, h]`` then an in-place ReLU (the issue's reproduction)."""

    def __init__(self) -> None:
        super().__init__(16, 4)

    def forward(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        h = self.a(x)
        h = torch.relu_(h) if inplace else torch.relu(h)
        return self.b(h)


class Residual4d(TwoLinear):
    """Linear on ``[B, C, T, h]``, a residual added in place, then a slice scaled in place."""

    def forward(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        h = self.a(x)
        if inplace:
            h += x
            h[:, :, 0] *= 2.0
        else:
            h = h + x
            scale = torch.ones(h.shape[2], 1)
            scale[0] = 2.0
            h = h * scale
        return self.b(torch.tanh(h))


class ConsumedBefore(TwoLinear):
    """The output read by another op before the in-place ones (the gradient of its values
    before them comes through both), one of those through a transposed view of it."""

    def forward(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        h = self.a(x)
        skip = h * 0.5  # (a scalar product: saves no copy of h)
        if inplace:
            h.transpose(0, 1)[1:] *= 2.0
            torch.relu_(h)
        else:
            scale = torch.ones(h.shape[1], 1)
            scale[1:] = 2.0
            h = torch.relu(h * scale)
        return self.b(h + skip)


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (sequence first: its output is out_proj's own), a residual
    added in place (in the watched module's layout out_proj's output is no view: a guard)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        q = x.transpose(0, 1)  # [T, B, E]
        out = self.attn(q, q, q, need_weights=False)[0]
        if inplace:
            out += q
        else:
            out = out + q
        return self.head(out.transpose(0, 1))


class ConvNet(nn.Module):
    """A convolution (its output is no view) then an in-place ReLU, and a bias-free Linear on
    3-D input (no view either)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(5, 4, 3)
        self.fc = nn.Linear(6, 3, bias=False)

    def forward(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        h = self.conv(x.transpose(1, 2))  # [B, 4, 6]
        h = torch.relu_(h) if inplace else torch.relu(h)
        out = self.fc(h)
        return torch.relu_(out) if inplace else torch.relu(out)


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear-3d-relu": (Sequence3d, (6, 5, 8)),
    "linear-4d-residual": (Residual4d, (6, 3, 4, 8)),
    "linear-3d-consumed-before": (ConsumedBefore, (6, 5, 8)),
    "attention-residual": (Attention, (6, 5, 8)),
    "conv-and-unbiased-linear": (ConvNet, (6, 8, 5)),
}


def record(case: str, inplace: bool) -> tuple[list[str], np.ndarray]:
    make, shape = CASES[case]
    torch.manual_seed(0)
    model = make()
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        with streamspec.watch(model, ["a", "b"], rank=3, live=False) as mon:
            for _ in range(3):
                mon.label(labels)
                model(torch.randn(*shape, generator=gen), inplace).pow(2).sum().backward()
            ds = mon.to_xarray()
    return list(ds.layer.values), ds["sigma"].values


@pytest.mark.parametrize("case", list(CASES))
def test_an_in_place_op_on_the_output_records_as_out_of_place(case: str) -> None:
    layers, plain = record(case, inplace=False)
    got_layers, got = record(case, inplace=True)
    assert got_layers == layers
    # NaN only where the plain run has it too: σ₃ of a 2-wide output, attention's q/k/v block
    # sites (self-attention runs the packed projection)
    recorded = ~np.isnan(plain[..., 0]).any(axis=(0, 2, 3))
    assert recorded.sum() >= 2
    unrecorded = np.isnan(got[..., 0]).any(axis=(0, 2, 3)) & recorded
    assert not unrecorded.any(), [n for n, lost in zip(layers, unrecorded, strict=True) if lost]
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-6)


def test_a_gradient_taken_at_a_view_output_records_the_layer() -> None:
    """``autograd.grad(loss, inputs=[h])`` outside paused() stops at ``h``, a Linear's output on
    3-D input: the base's node never runs, so the hook there never fires; the one on ``h`` then
    records the layer, as for a Linear whose output is no view. Such a backward is a step of its
    own, with the same adjoints as the step's backward: both steps record the same spectra."""
    torch.manual_seed(0)
    model = Sequence3d()
    gen = torch.Generator().manual_seed(1)
    with streamspec.watch(model, ["a", "b"], rank=3, exact_rows=64, live=False) as mon:
        for _ in range(2):  # (the exact route: the same rows, the same spectra)
            mon.label(torch.tensor([0, 1, 0, 1, 1, 0]))
            h = model.a(torch.randn(6, 5, 8, generator=gen))
            loss = model.b(torch.relu(h)).pow(2).sum()
            torch.autograd.grad(loss, h, retain_graph=True)
            loss.backward()
        ds = mon.to_xarray()
    sigma = ds["sigma"].values  # [step, layer, kind, group, rank]
    assert sigma.shape[0] == 4
    assert not np.isnan(sigma[:, 0, :, :, 0]).any()  # a.weight in every step
    np.testing.assert_allclose(sigma[0::2], sigma[1::2], rtol=1e-5)


@pytest.mark.parametrize("inplace", [False, True])
def test_view_outputs_and_their_bases_are_freed_without_the_cycle_collector(inplace: bool) -> None:
    """The hooks on a view output and on its base hold neither tensor: both are freed with the
    step's graph, with the cycle collector off (a cycle would keep every step's activations)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 2))
    seen: list[weakref.ref[torch.Tensor]] = []

    def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        assert output._base is not None  # (a view: the case under test)
        seen.extend([weakref.ref(output), weakref.ref(output._base)])

    for layer in (model[0], model[2]):
        layer.register_forward_hook(keep)
    gc.disable()
    try:
        with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
            for _ in range(3):
                mon.label(torch.tensor([0, 1, 0, 1]))
                model(torch.randn(4, 3, 4)).sum().backward()
            assert len(seen) == 12
            assert all(ref() is None for ref in seen)
            assert not np.isnan(mon.to_xarray()["sigma"].values[..., 0]).any()
    finally:
        gc.enable()
