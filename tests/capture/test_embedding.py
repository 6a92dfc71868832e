"""nn.Embedding: one-hot activation rows, scatter-added gradient, padding_idx left out."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import streamspec
from streamspec.testing.reference import masked_loss_gradients
from tests.conftest import relative_errors


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8, padding_idx=0)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens))).mean(dim=1)


@pytest.mark.parametrize("exact_rows", [None, 0], ids=["default", "sketched"])
def test_embedding_spectra(exact_rows) -> None:
    torch.manual_seed(0)
    model = Tagger()
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, 30, (6, 5))
    tokens[0, :2] = 0  # padding tokens: no gradient, not rows
    labels = torch.tensor([0, 1, 1, 0, -1, 1])
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    outputs: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        outputs.append(output)

    handle = model.embed.register_forward_hook(keep)
    with streamspec.watch(
        model, ["a", "b"], rank=4, normalize="sum", live=False, exact_rows=exact_rows
    ) as mon:
        assert mon.layers == ("embed.weight", "head.weight")
        mon.label(labels)
        nn.functional.cross_entropy(model(tokens), target).backward()
        ds = mon.to_xarray()
    handle.remove()
    grad_out = outputs[-1].grad.double()
    per_sample = nn.functional.cross_entropy(twin(tokens), target, reduction="none") / 6
    ref = masked_loss_gradients(twin, per_sample, labels, 2, names=["embed.weight"])
    sigma = ds["sigma"].values[0, 0]
    for c in range(2):
        mask = (labels == c)[:, None] & (tokens != 0)
        onehot = nn.functional.one_hot(tokens[mask], 30).double()
        d = grad_out[mask]
        expected = np.full((3, 4), np.nan)
        for i, m in enumerate((onehot, d, onehot.T @ d)):
            s = torch.linalg.svdvals(m).numpy()
            bound = min(onehot.shape[0], *m.shape)
            expected[i, : min(4, bound)] = s[: min(4, bound)]
        assert relative_errors(sigma[:, c], expected).max() < 1e-2, (sigma[:, c], expected)
        sg = torch.linalg.svdvals(ref[c]["embed.weight"].double()).numpy()[:4]
        np.testing.assert_allclose(sigma[2, c], sg, rtol=1e-2)


def test_embedding_under_a_float64_default_dtype() -> None:
    """``torch.set_default_dtype(torch.float64)`` (a whole float64 model): the exact route's
    one-hot rows are built in float32 like every other row (they were built in the default dtype,
    the scatter failed and the monitor stopped recording)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = Tagger()
        tokens = torch.randint(1, 30, (4, 5))
        with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
            for _ in range(2):
                mon.label(torch.tensor([0, 1, 0, 1]))
                model(tokens).pow(2).sum().backward()
            ds = mon.to_xarray()
    finally:
        torch.set_default_dtype(previous)
    assert mon._failed is None
    assert np.isfinite(ds["sigma"].values[..., 0]).all()
    onehot = nn.functional.one_hot(tokens[::2].reshape(-1), 30).double()
    expected = torch.linalg.svdvals(onehot).numpy()[:2] / np.sqrt(2)  # "mean": σ/√n_c
    np.testing.assert_allclose(ds["sigma"].values[-1, 0, 0, 0], expected, rtol=1e-5)


def test_scale_grad_by_freq_is_reported_not_recorded_wrong() -> None:
    """Its gradient is not A_cᵀΔ_c of one-hot rows (each row is divided by its token's count):
    reported by validate() and left unwatched (it recorded σ(G) 8× too large)."""
    model = nn.Sequential(nn.Embedding(30, 8, scale_grad_by_freq=True), nn.Linear(8, 3))
    problems = streamspec.validate(model)
    assert any("scale_grad_by_freq" in p for p in problems)
    with (
        pytest.warns(streamspec.StreamspecWarning, match="scale_grad_by_freq"),
        streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon,
    ):
        assert mon.layers == ("1.weight",)


class TinyGPT(nn.Module):
    """nanoGPT's embeddings: token ids [B, T] plus positions shared by the batch (``[T]``,
    ``[1, T]``) or expanded to it (``[B, T]``)."""

    def __init__(self, positions: str) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(11, 8), nn.Embedding(16, 8)
        self.head = nn.Linear(8, 11)
        self.positions = positions

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1])
        ids = {"1d": pos, "2d": pos[None], "expanded": pos.expand(idx.shape[0], -1)}
        return self.head(self.wte(idx) + self.wpe(ids[self.positions]))


@pytest.mark.parametrize("positions", ["1d", "2d"])
def test_positions_shared_by_the_batch_leave_the_model_unchanged(positions: str) -> None:
    """``wpe(arange(T))`` or ``wpe(arange(T)[None])``: ids shared by the batch, whose output
    broadcasts over the samples (so only the sum of the samples' gradients reaches it). The
    model computes exactly what it computes unwatched; the shared layer's steps are NaN, with
    one warning saying how to record it; the other layers are recorded."""
    torch.manual_seed(0)
    idx, labels = torch.randint(0, 11, (4, 6)), torch.tensor([0, 1, 0, 1])
    model = TinyGPT(positions)
    twin = copy.deepcopy(model)
    with (
        pytest.warns(streamspec.StreamspecWarning, match=r"wpe\.weight .*expand\(4, -1\)"),
        streamspec.watch(model, ["a", "b"], rank=3, live=False) as mon,
    ):
        for _ in range(2):
            mon.label(labels)
            out = model(idx)
            assert out.shape == twin(idx).shape == (4, 6, 11)
            out.pow(2).mean().backward()
            twin(idx).pow(2).mean().backward()
        ds = mon.to_xarray()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    sigma = ds["sigma"]
    assert np.isnan(sigma.sel(layer="wpe.weight").values).all()
    assert np.isfinite(sigma.sel(layer="wte.weight").values[..., 0]).all()


class NormPenalty(nn.Module):
    """A position table used other than by broadcasting: a penalty on its rows, and a
    squeeze. (Expanding the output to the batch, as streamspec once did, raised here, and made
    the penalty B times larger.)"""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(10, 4), nn.Embedding(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.pos(torch.arange(x.shape[1])[None])  # [1, T, d]
        scores = torch.einsum("btd,sd->bts", self.tok(x), pos.squeeze(0))
        return scores.mean() + 1e-2 * pos.pow(2).sum()


def test_a_shared_position_table_used_other_than_by_broadcasting() -> None:
    torch.manual_seed(0)
    model = NormPenalty()
    twin = copy.deepcopy(model)
    x = torch.randint(0, 10, (6, 5))
    with (
        pytest.warns(streamspec.StreamspecWarning, match="shared by the batch"),
        streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon,
    ):
        mon.label([0, 1, 0, 1, 0, 1])
        loss = model(x)
        loss.backward()
    plain = twin(x)
    plain.backward()
    assert loss.item() == plain.item()
    torch.testing.assert_close(model.pos.weight.grad, twin.pos.weight.grad, rtol=0, atol=0)


def test_positions_expanded_to_the_batch_are_recorded_per_sample() -> None:
    """``wpe(arange(T).expand(B, -1))``, the warning's fix: the positions' gradient per group."""
    torch.manual_seed(0)
    idx, labels = torch.randint(0, 11, (4, 6)), torch.tensor([0, 1, 0, 1])
    model = TinyGPT("expanded")
    with streamspec.watch(model, ["a", "b"], rank=3, live=False, normalize="sum") as mon:
        mon.label(labels)
        model(idx).pow(2).mean().backward()
        ds = mon.to_xarray()
    sigma = ds["sigma"].sel(layer="wpe.weight").values[0]  # [kind, group, rank]
    ids = torch.arange(6).expand(4, 6)
    for c in (0, 1):
        mask = labels == c
        # Exact per-group adjoint of wpe's rows: recompute with a per-sample position table.
        table = model.wpe.weight.detach().clone().requires_grad_(True)
        out = model.head(model.wte(idx[mask]) + table[ids[mask]])
        out.pow(2).sum().div(idx.numel() * 11).backward()
        expected = torch.linalg.svdvals(table.grad.double())[:3].numpy()
        np.testing.assert_allclose(sigma[2, c, : expected.size], expected, rtol=1e-4)
