"""LayerTracker invariants: orthonormal [Ω | W] blocks through steps, seeding and epochs."""

from __future__ import annotations

import torch

from streamspec.sketch.tracker import LayerTracker


def blocks(tracker: LayerTracker) -> list[torch.Tensor]:
    return [torch.cat([tracker.omega(side), tracker.warm(side)], dim=2) for side in ("in", "out")]


def test_blocks_stay_orthonormal_across_steps_absent_groups_and_epochs() -> None:
    g = torch.Generator().manual_seed(0)
    tracker = LayerTracker(100, 80, 2, 8, 10, g)
    data = torch.Generator().manual_seed(1)
    for epoch in range(3):
        for step in range(4):
            a = torch.randn(2, 60, 100, generator=data)
            d = torch.randn(2, 60, 80, generator=data)
            if step == 1:  # group 1 absent from this step (zero rows)
                a[1] = 0
                d[1] = 0
            tracker.step(a, d, exact=False)
            for b in blocks(tracker):
                eye = torch.eye(b.shape[-1]).expand(2, -1, -1)
                err = (b.mT @ b - eye).abs().max().item()
                assert err < 1e-5, (epoch, step, err)
        tracker.end_epoch()
        for b in blocks(tracker):
            assert (b.mT @ b - torch.eye(b.shape[-1])).abs().max().item() < 1e-5
