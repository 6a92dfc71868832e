"""GPU checks (skipped without CUDA): no host sync inside a monitored step; GPU == CPU numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import streamspec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def encoder(device: str) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    return nn.Sequential(
        nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(64, 8)
    ).to(device)


def test_monitored_steps_do_not_synchronise() -> None:
    """Every op of a monitored step (hooks, gathers, sketches, async copies) runs under
    ``torch.cuda.set_sync_debug_mode("error")``: any host-device sync raises."""
    model = encoder("cuda")
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(8, 16, 64, device="cuda")
    labels = torch.arange(8) % 2  # labels on the CPU, as documented
    with streamspec.watch(model, ["a", "b"], rank=4, live=False) as mon:
        for step in range(4):  # the first step warms up (allocations, seeding)
            mon.label(labels)
            if step >= 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        ds = mon.to_xarray()
    assert np.isfinite(ds["sigma"].values[:, :, :, :, 0]).all()


def test_gpu_spectra_equal_cpu_spectra() -> None:
    x = torch.randn(8, 16, 64)
    labels = torch.arange(8) % 2
    out = {}
    for device in ("cpu", "cuda"):
        model = encoder(device)
        with streamspec.watch(model, ["a", "b"], rank=4, live=False) as mon:
            for _ in range(3):
                mon.label(labels)
                model(x.to(device)).pow(2).mean().backward()
            out[device] = mon.to_xarray()["sigma"].values
    np.testing.assert_allclose(out["cuda"], out["cpu"], rtol=2e-3, atol=1e-6)
