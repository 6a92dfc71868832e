"""Conv1d/2d/3d: recorded spectra vs exactly unfolded matrices and masked-loss autograd."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import streamspec
from streamspec.testing.reference import masked_loss_gradients, unfold_patches
from tests.conftest import relative_errors

CASES = {
    "1d-stride2-pad1": (
        nn.Conv1d,
        dict(in_channels=3, out_channels=6, kernel_size=3, stride=2, padding=1),
        (10,),
    ),
    "2d-same": (
        nn.Conv2d,
        dict(in_channels=2, out_channels=5, kernel_size=3, padding="same"),
        (6, 5),
    ),
    "2d-dilated-reflect": (
        nn.Conv2d,
        dict(
            in_channels=2,
            out_channels=4,
            kernel_size=2,
            stride=2,
            padding=1,
            dilation=2,
            padding_mode="reflect",
        ),
        (7, 7),
    ),
    "3d-pad1": (
        nn.Conv3d,
        dict(in_channels=2, out_channels=3, kernel_size=2, padding=1),
        (3, 3, 2),
    ),
}


def exact(a: torch.Tensor, d: torch.Tensor, rank: int) -> np.ndarray:
    out = np.full((3, rank), np.nan)
    for i, m in enumerate((a, d, a.T @ d)):
        s = torch.linalg.svdvals(m).numpy()
        bound = min(a.shape[0], *m.shape)
        out[i, : min(bound, rank)] = s[: min(bound, rank)]
    return out


@pytest.mark.parametrize("exact_rows", [None, 0], ids=["default", "sketched"])
@pytest.mark.parametrize("case", list(CASES))
def test_conv_spectra_match_unfolded_matrices_and_autograd(case: str, exact_rows) -> None:
    cls, kwargs, spatial = CASES[case]
    torch.manual_seed(0)
    conv = cls(**kwargs)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(6, kwargs["in_channels"], *spatial)
    model(x)  # materialise the lazy layer
    twin = copy.deepcopy(model)
    labels = torch.tensor([0, 1, 0, 1, -1, 1])
    rank = 4
    outputs: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        outputs.append(output)

    handle = conv.register_forward_hook(keep)
    with streamspec.watch(
        model, ["a", "b"], rank=rank, normalize="sum", live=False, exact_rows=exact_rows
    ) as mon:
        assert mon.layers == ("0.weight", "3.weight")
        mon.label(labels)
        loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1, 2]))
        loss.backward()
        ds = mon.to_xarray()
    handle.remove()
    out_grad = outputs[-1].grad
    # Explicit matrices: padded input as the module pads it, then Tensor.unfold.
    xin = x
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        xin = nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(conv.kernel_size)
    patches = unfold_patches(xin, conv.kernel_size, conv.stride, padding, conv.dilation)
    adjoints = out_grad.double().reshape(6, conv.out_channels, -1).transpose(1, 2)
    per_sample = (
        nn.functional.cross_entropy(twin(x), torch.tensor([0, 1, 2, 0, 1, 2]), reduction="none") / 6
    )
    reference = masked_loss_gradients(twin, per_sample, labels, 2, names=["0.weight"])
    sigma = ds["sigma"].values[0, 0]  # [kind, group, rank]
    for c in range(2):
        mask = labels == c
        a = patches[mask].reshape(-1, patches.shape[-1])
        d = adjoints[mask].reshape(-1, adjoints.shape[-1])
        ref = exact(a, d, rank)
        tol = 1e-4 if exact_rows is None else 1e-2
        assert relative_errors(sigma[:, c], ref).max() < tol, (c, sigma[:, c], ref)
        g = reference[c]["0.weight"].reshape(conv.out_channels, -1).double()
        sg = np.full(rank, np.nan)
        values = torch.linalg.svdvals(g).numpy()[:rank]
        sg[: values.size] = values
        assert relative_errors(sigma[2, c], sg).max() < 1e-2


def test_grouped_conv_is_reported_not_watched() -> None:
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 4, 8))
    problems = streamspec.validate(model)
    assert len(problems) == 1 and "groups=2" in problems[0]
    with pytest.warns(streamspec.StreamspecWarning, match="groups=2"):
        mon = streamspec.watch(model, ["a"], rank=2, live=False)
    assert mon.layers == ("2.weight",)
    mon.close()
    with pytest.raises(streamspec.StreamspecError, match="groups=2"):
        streamspec.watch(model, ["a"], rank=2, live=False, on_unsupported="error")
    streamspec.watch(model, ["a"], rank=2, live=False, on_unsupported="skip").close()


def test_validate_lists_every_problem_at_once() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.matrix = nn.Parameter(torch.randn(3, 3))
            self.norm = nn.LayerNorm(3)

    model = nn.Sequential(Odd(), nn.Conv2d(2, 2, 1, groups=2), nn.Bilinear(2, 2, 2))
    problems = streamspec.validate(model)
    text = "\n".join(problems)
    assert (
        "Odd" in text
        and "groups=2" in text
        and "Bilinear" in text
        and "nothing would be recorded" in text
    )
    assert "LayerNorm" not in text  # normalisation parameters are not matrices
    assert streamspec.validate(nn.Linear(2, 2)) == []


def tying_reference(
    patches: torch.Tensor, adjoints: torch.Tensor, mask: torch.Tensor, rank: int
) -> np.ndarray:
    """σ of the [P, h_in·h_out] matrix whose row p is Σ_{i∈c} a_ipᵀ δ_ip (explicit)."""
    rows = torch.einsum("npi,npo->pio", patches[mask], adjoints[mask]).reshape(patches.shape[1], -1)
    s = torch.linalg.svdvals(rows).numpy()
    out = np.full(rank, np.nan)
    out[: min(rank, s.size)] = s[:rank]
    return out


@pytest.mark.parametrize("exact_rows", [None, 0], ids=["exact", "sketched"])
def test_tied_spectra_of_a_convolution(exact_rows) -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5, 2))
    x = torch.randn(4, 2, 5)
    labels = torch.tensor([0, 1, 1, 0])
    outputs: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        outputs.append(output)

    handle = conv.register_forward_hook(keep)
    with streamspec.watch(
        model, ["a", "b"], rank=4, normalize="sum", tied=True, live=False, exact_rows=exact_rows
    ) as mon:
        mon.label(labels)
        model(x).pow(2).sum().backward()
        ds = mon.to_xarray()
    handle.remove()
    assert ds["sigma_tied"].dims == ("step", "layer", "group", "rank")
    assert np.isnan(ds["sigma_tied"].values[0, 1]).all()  # a Linear layer has no tying dimension
    patches = unfold_patches(x, (3,), (1,), (1,), (1,))
    adjoints = outputs[-1].grad.double().transpose(1, 2)
    for c in range(2):
        ref = tying_reference(patches, adjoints, labels == c, 4)
        got = ds["sigma_tied"].values[0, 0, c]
        assert relative_errors(got, ref).max() < 1e-4, (got, ref)


def test_untied_runs_have_no_sigma_tied() -> None:
    model = nn.Sequential(nn.Conv1d(1, 2, 2), nn.Flatten(), nn.LazyLinear(1))
    model(torch.randn(1, 1, 4))
    with streamspec.watch(model, ["a"], rank=2, live=False) as mon:
        mon.label([0, 0])
        model(torch.randn(2, 1, 4)).sum().backward()
        assert "sigma_tied" not in mon.to_xarray()


@pytest.mark.parametrize("exact_tying", [True, False], ids=["exact-gram", "projected"])
def test_tied_spectra_beyond_the_sketch_width(monkeypatch, exact_tying: bool) -> None:
    """h_in = 48 > sketch width: exact while rows are moderate; projected (a lower bound) beyond."""
    from streamspec.sketch import tracker

    if not exact_tying:
        monkeypatch.setattr(tracker, "TIED_EXACT_ROWS", 0)
    torch.manual_seed(0)
    conv = nn.Conv1d(16, 12, 3, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(12 * 20, 2))
    outputs: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        outputs.append(output)

    conv.register_forward_hook(keep)
    # Inputs of decaying spectrum (as real data): a few directions dominate the channels.
    mix = torch.randn(16, 16) * (0.5 ** torch.arange(16.0))
    steps = []
    with streamspec.watch(
        model, ["a", "b"], rank=4, normalize="sum", tied=True, live=False, exact_rows=0
    ) as mon:
        for _ in range(4):
            x = torch.einsum("ij,bjt->bit", mix, torch.randn(16, 16, 20))
            labels = torch.arange(16) % 2
            mon.label(labels)
            model(x).pow(2).sum().backward()
            steps.append((x, labels, outputs[-1].grad.double().transpose(1, 2)))
        ds = mon.to_xarray()
    for s, (x, labels, adjoints) in enumerate(steps):
        patches = unfold_patches(x, (3,), (1,), (1,), (1,))
        for c in range(2):
            ref = tying_reference(patches, adjoints, labels == c, 4)
            got = ds["sigma_tied"].values[s, 0, c]
            assert np.all(got <= ref * (1 + 1e-5))  # never above the truth
            # The projected route (> TIED_EXACT_ROWS rows) keeps the step's bases, [Ω | W] of
            # 47 columns here for a 48-wide input: a lower bound within ~20% on this input.
            assert relative_errors(got, ref).max() < (1e-5 if exact_tying else 0.25), (got, ref)


@pytest.mark.parametrize(
    ("spatial", "kernel", "stride", "padding", "dilation"),
    [
        ((9,), (3,), (1,), (0,), (1,)),
        ((8, 7), (3, 2), (2, 1), (1, 0), (1, 2)),
        ((6, 7, 5), (3, 3, 2), (1, 2, 1), (1, 1, 0), (2, 1, 1)),
    ],
)
def test_conv_patches_equal_the_convolution_products(spatial, kernel, stride, padding, dilation):
    """The patches cut out of strided views of the input (``dense``, and the Gram of
    ``[A | Δ]`` of a first convolution) equal what the convolution routines compute with them:
    ``A·X`` as a convolution with ``X`` as filters, for strides, padding and dilation; and the
    squared norms weighted by window counts equal the patches' own."""
    from streamspec.sketch.operators import ConvRows

    gen = torch.Generator().manual_seed(7)
    a = ConvRows(torch.randn(2, 3, 2, *spatial, generator=gen), kernel, stride, padding, dilation)
    c, m, h = a.shape
    x = torch.randn(c, h, 5, generator=gen)
    torch.testing.assert_close(a.dense() @ x, a.mm(x), rtol=1e-5, atol=1e-5)
    d = torch.randn(c, m, 4, generator=gen)
    both = torch.cat([a.dense(), d], dim=2).double()
    torch.testing.assert_close(a.gram_with(d).double(), both.mT @ both, rtol=1e-5, atol=1e-4)
    squares = a.dense().double().square().sum(dim=(1, 2))
    torch.testing.assert_close(a.sq_norm(), squares, rtol=1e-7, atol=0)
