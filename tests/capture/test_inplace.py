"""In-place ops on a watched layer's output (``nn.ReLU(inplace=True)``, ``x += residual``) record
the same spectra as their out-of-place forms.

``nn.Linear`` on input of 3 or more dims returns a view of its 2-D product; an in-place op on a
view replaces the view's autograd node, and a gradient hook on that node never fired: the layer
was silently unrecorded (NaN) at every step.
"""

from __future__ import annotations

import warnings
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
