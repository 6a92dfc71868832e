"""Subprocess side of the crash tests: trains until killed. Run as a script; the tests import
``build``, ``train`` and the constants to resume the same run in-process.

``python _train_worker.py PATH`` trains a tiny MLP under ``streamspec.watch(..., store=PATH)``
forever, ending an epoch every ``STEPS_PER_EPOCH`` steps; every ``FLUSH_EVERY`` steps it calls
``mon.flush()`` and then prints ``flushed N``: the first N steps are committed from then on.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import streamspec

GROUPS = ("a", "b")
RANK = 4
BATCH = 12
STEPS_PER_EPOCH = 8
FLUSH_EVERY = 3


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def train(mon: streamspec.Monitor, model: nn.Module, steps: int | None, announce: bool) -> None:
    """Train ``steps`` steps (forever if None) from ``mon.step``, closing epochs on schedule."""
    data = torch.Generator().manual_seed(mon.step)
    labels = torch.tensor([0, 1, -1] * (BATCH // 3))
    done = 0
    while steps is None or done < steps:
        x = torch.randn(BATCH, 8, generator=data)
        y = torch.randint(0, 3, (BATCH,), generator=data)
        mon.label(labels)
        loss = nn.functional.cross_entropy(model(x), y)
        model.zero_grad()
        loss.backward()
        with torch.no_grad():  # plain SGD: torch.optim's first use imports torch._dynamo (~2 s)
            for p in model.parameters():
                p -= 0.05 * p.grad
        done += 1
        if mon.step % STEPS_PER_EPOCH == 0:
            mon.end_epoch()
        if announce and mon.step % FLUSH_EVERY == 0:
            mon.flush()
            print(f"flushed {mon.step}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny matrices: threads only contend with the test runner
    model = build()
    monitor = streamspec.watch(model, GROUPS, RANK, store=sys.argv[1], live=False)
    train(monitor, model, steps=None, announce=True)
