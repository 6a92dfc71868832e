"""``mon.paused()``: backward passes that are not the training step's record nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import streamspec
from streamspec.errors import StreamspecError


def critic() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 1))


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(10, 6, generator=gen) + 1.0,  # real
            torch.randn(10, 6, generator=gen),  # fake
            torch.arange(20) % 2,  # groups of [real; fake]
        )
        for _ in range(steps)
    ]


def gradient_penalty(model: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    alpha = torch.rand(len(real), 1, generator=torch.Generator().manual_seed(2))
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.norm(dim=1) - 1) ** 2).mean()


@pytest.mark.parametrize("exact_rows", [None, 0], ids=["exact", "sketched"])
def test_a_gradient_penalty_inside_paused_is_no_step_and_leaves_the_step_as_without_it(
    exact_rows,
) -> None:
    """WGAN-GP: the penalty's autograd.grad through the critic recorded a step of its own (two
    steps per iteration, one of them the penalty's adjoints). Inside paused() each iteration is
    one step, recording the same as the same iteration without a penalty (the weights are held
    fixed, lr = 0, so both runs see the same critic)."""

    def run(penalty: bool) -> np.ndarray:
        model = critic()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with streamspec.watch(model, ["a", "b"], rank=3, live=False, exact_rows=exact_rows) as mon:
            for real, fake, groups in batches(4):
                mon.label(groups)
                scores = model(torch.cat([real, fake]))
                loss = scores[10:].mean() - scores[:10].mean()
                if penalty:
                    with mon.paused():
                        loss = loss + 10 * gradient_penalty(model, real, fake)
                opt.zero_grad()
                loss.backward()
                opt.step()
            assert mon.step == 4
        return mon.to_xarray().sigma.values

    with_penalty, without = run(True), run(False)
    assert with_penalty.shape == without.shape
    assert np.isfinite(without[:, 0]).all()  # (the 1-wide head has one σ for Δ and G: NaN rest)
    np.testing.assert_allclose(with_penalty, without, rtol=1e-5)


def test_adversarial_examples_made_inside_paused_leave_one_step_per_iteration() -> None:
    """FGSM adversarial training with an LSTM: the attack's input gradient is no step (its
    recurrent twin runs the fused kernel), and each training step records what a run whose
    attack used an unwatched copy of the model records."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(4, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), x)
        return (x + 0.1 * grad.sign()).detach()

    def run(attack_inside_pause: bool) -> np.ndarray:
        torch.manual_seed(0)
        model = Net()
        twin = copy.deepcopy(model)  # made before watch(): no hooks
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        gen = torch.Generator().manual_seed(3)
        with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
            for _ in range(3):
                x, y = torch.randn(12, 5, 4, generator=gen), torch.randint(0, 3, (12,))
                if attack_inside_pause:
                    with mon.paused():
                        x_adv = fgsm(model, x, y)
                else:
                    x_adv = fgsm(twin, x, y)
                mon.label(torch.arange(12) % 2)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x_adv), y).backward()
                opt.step()
            assert mon.step == 3
        return mon.to_xarray().sigma.values

    np.testing.assert_allclose(run(True), run(False), rtol=1e-5)


def test_paused_on_a_closed_monitor_is_a_usage_error() -> None:
    mon = streamspec.watch(critic(), ["a", "b"], rank=2, live=False)
    mon.close()
    with pytest.raises(StreamspecError, match="open monitor"), mon.paused():
        pass
