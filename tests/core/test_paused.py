"""``mon.paused()``: backward passes that are not the training step's record nothing."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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


class CheckpointedCritic(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 24), nn.Tanh())
        self.head = nn.Linear(24, 1)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:

        return self.head(checkpoint(self.body, x, use_reentrant=self.reentrant))


def critic_run(model: nn.Module, penalty: str | None, steps: int = 3) -> tuple[np.ndarray, int]:
    """WGAN-style iterations; ``penalty``: None, "gp" (on interpolates) or "r1" (on the step's
    own real logits), computed inside paused()."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with streamspec.watch(model, ["a", "b"], rank=3, live=False) as mon:
        for real, fake, groups in batches(steps):
            real = real.clone().requires_grad_(penalty is not None and penalty.startswith("r1"))
            mon.label(groups)
            scores = model(torch.cat([real, fake]))
            loss = scores[10:].mean() - scores[:10].mean()
            if penalty == "gp":
                with mon.paused():
                    loss = loss + 10 * gradient_penalty(model, real.detach(), fake)
            elif penalty is not None and penalty.startswith("r1"):
                with mon.paused() if penalty == "r1" else contextlib.nullcontext():
                    (grad,) = torch.autograd.grad(scores[:10].sum(), real, create_graph=True)
                    loss = loss + grad.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        step = mon.step
    return mon.to_xarray().sigma.values, step


def test_a_penalty_on_a_critic_with_non_reentrant_checkpointing_is_no_step() -> None:
    """The penalty's checkpointed segment is recomputed in the step's backward, outside the
    block, on 10 samples where the labels say 20: that raised "expected 20 samples" in the
    user's backward. It is ignored; the steps equal those without the penalty."""
    with_gp, steps = critic_run(CheckpointedCritic(reentrant=False), "gp")
    without, _ = critic_run(CheckpointedCritic(reentrant=False), None)
    assert steps == 3
    np.testing.assert_allclose(with_gp, without, rtol=1e-5)


def test_an_r1_penalty_through_the_steps_own_outputs_is_no_step() -> None:
    """An R1 penalty differentiates the step's own real logits inside the block: the hooks on
    those outputs fired, two steps per iteration. Inside paused() only the step's backward
    records: each iteration's second step of the unpaused run (the penalty's gradient reaches
    the first layer's output through tanh's derivative, so it is in Δ there, as it should)."""
    paused, steps = critic_run(critic(), "r1")
    unpaused, unpaused_steps = critic_run(critic(), "r1-unpaused")
    assert steps == 3 and unpaused_steps == 6
    np.testing.assert_allclose(paused, unpaused[1::2], rtol=1e-5)


def test_a_labelling_only_for_a_paused_forward_is_no_batch_of_the_step() -> None:
    """label() for a saliency map inside the block, then the step with reentrant checkpointing:
    the first labelling counted as a second batch of the step, and the recomputed layers were
    left unrecorded (a step lost, with a warning about several labelled batches)."""
    import warnings

    model = CheckpointedCritic(reentrant=True)
    with streamspec.watch(model, ["a", "b"], rank=3, live=False) as mon:
        for real, fake, groups in batches(2):
            with mon.paused():
                mon.label(torch.arange(10) % 2)
                x = real.clone().requires_grad_(True)
                model(x).sum().backward()  # (reentrant checkpointing refuses autograd.grad)
                model.zero_grad()
            mon.label(groups)
            with warnings.catch_warnings():
                warnings.simplefilter("error", streamspec.StreamspecWarning)
                model(torch.cat([real, fake]).requires_grad_(True)).sum().backward()
    sigma = mon.to_xarray().sigma.values
    assert sigma.shape[0] == 2 and np.isfinite(sigma[:, :, :, :, 0]).all()


def test_paused_on_another_thread_warns_that_it_pauses_training_too() -> None:
    import threading

    model = critic()
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        mon.label(torch.arange(4) % 2)
        caught: list[str] = []

        def saliency() -> None:
            import warnings

            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                with mon.paused():
                    pass
            caught.extend(str(w.message) for w in seen)

        worker = threading.Thread(target=saliency)
        worker.start()
        worker.join()
    assert any("pauses the monitor for every thread" in message for message in caught)


def test_a_label_inside_paused_is_undone_when_the_block_ends() -> None:
    """label(g), the step's reentrant-checkpointed forward, then a block that labels and runs a
    batch of the same size: the step's backward recomputes its forward with the labels in force,
    which were the block's (counts [30, 10] for 20 samples, both layers NaN). They are the
    step's own again once the block ends: the records equal those without the block."""

    def run(with_block: bool) -> tuple[np.ndarray, np.ndarray]:
        model = CheckpointedCritic(reentrant=True)
        with streamspec.watch(model, ["a", "b"], rank=3, live=False) as mon:
            for real, fake, groups in batches(2):
                mon.label(groups)
                loss = model(torch.cat([real, fake]).requires_grad_(True)).sum()
                if with_block:
                    with mon.paused(), torch.no_grad():
                        mon.label(torch.zeros(20, dtype=torch.long))
                        model.head(model.body(torch.cat([fake, real])))
                loss.backward()
        ds = mon.to_xarray()
        return ds.sigma.values, ds["count"].values

    (sigma, counts), (plain, plain_counts) = run(True), run(False)
    np.testing.assert_array_equal(counts, plain_counts)
    assert (counts == 10).all()
    np.testing.assert_allclose(sigma, plain, rtol=1e-6)


def test_reentrant_checkpointing_without_labels_is_still_a_usage_error() -> None:
    """A recomputation with no labels ever set is the user's mistake, as without checkpointing
    (a change for paused() had turned it into a misleading warning and an unrecorded step)."""

    model = critic()  # all of it checkpointed: its forward only runs inside the backward
    with streamspec.watch(model, ["a", "b"], rank=3, live=False):
        x = torch.randn(10, 6, requires_grad=True)
        with pytest.raises(StreamspecError, match="mon.label"):
            checkpoint(model, x, use_reentrant=True).sum().backward()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_backwards_in_another_order_than_their_forwards_never_raise(reentrant) -> None:
    """label(g10), forward; label(g6), forward; then the second batch's backward before the
    first's: the first batch's recomputation meets the second's labels. A review found the
    usage error raised into the user's backward (with non-reentrant checkpointing, whose
    recomputed outputs never even get gradients)."""

    model = critic()
    context = (
        pytest.warns(streamspec.StreamspecWarning, match="labels in force do not fit")
        if reentrant
        else contextlib.nullcontext()
    )
    with context, streamspec.watch(model, ["a", "b"], rank=3, live=False) as mon:
        mon.label(torch.arange(10) % 2)
        first = checkpoint(model, torch.randn(10, 6, requires_grad=True), use_reentrant=reentrant)
        mon.label(torch.arange(6) % 2)
        second = checkpoint(model, torch.randn(6, 6, requires_grad=True), use_reentrant=reentrant)
        second.sum().backward()
        first.sum().backward()
    ds = mon.to_xarray()
    if reentrant:  # which batch a recomputation belongs to is unknown: nothing credited
        assert ds.sizes["step"] == 0 or np.isnan(ds.sigma.values).all()
    else:  # the first forwards' captures hold: both steps recorded
        assert ds.sizes["step"] == 2
        assert np.isfinite(ds.sigma.values[:, 0, :, :, 0]).all()


def test_evaluation_labels_between_steps_leave_reentrant_steps_recorded() -> None:
    """Validation batches labelled under no_grad between training steps are no batches of the
    next step (they were counted, and the next step's recomputed layers were left NaN)."""
    model = CheckpointedCritic(reentrant=True)
    with streamspec.watch(model, ["a", "b"], rank=3, live=False) as mon:
        for real, fake, groups in batches(3):
            mon.label(groups)
            model(torch.cat([real, fake]).requires_grad_(True)).sum().backward()
            with torch.no_grad():
                for _ in range(2):
                    mon.label(torch.arange(10) % 2)
                    model.head(model.body(real))
    assert np.isfinite(mon.to_xarray().sigma.values[:, :, :, :, 0]).all()


def test_labels_inside_nested_blocks_are_undone_block_by_block() -> None:
    mon = streamspec.watch(critic(), ["a", "b"], rank=2, live=False)
    try:
        mon.label([0, 1])
        step_plan = mon._plan
        with mon.paused():
            mon.label([1, 1, 0])
            outer_plan = mon._plan
            with mon.paused():
                mon.label([0, 0, 0, 0])
            assert mon._plan is outer_plan
        assert mon._plan is step_plan
    finally:
        mon.close()


@pytest.mark.parametrize("worker_labels", [False, True], ids=["worker-silent", "worker-labels"])
def test_a_training_threads_label_during_another_threads_block_is_kept(worker_labels) -> None:
    """Only the labels of the thread whose block ends are undone, and only if nobody labelled
    since: the training thread labels during a worker's block (in which the worker may have
    labelled too), and keeps its labels when the block ends (they were replaced by the
    previous step's)."""
    import threading
    import warnings

    mon = streamspec.watch(critic(), ["a", "b"], rank=2, live=False)
    try:
        inside, done = threading.Event(), threading.Event()

        def saliency() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with mon.paused():
                    if worker_labels:
                        mon.label(torch.arange(8) % 2)
                    inside.set()
                    done.wait()

        worker = threading.Thread(target=saliency)
        worker.start()
        inside.wait()
        mon.label(torch.ones(4, dtype=torch.long))  # the training thread, during the block
        training_plan = mon._plan
        done.set()
        worker.join()
        assert mon._plan is training_plan
    finally:
        mon.close()


def assert_warm_up_leaves_nothing(make_model: Callable[[], nn.Module]) -> None:
    """A warm-up step (its forward outside paused(), its whole backward inside it), then two
    steps under warnings as errors: they record what the same two steps record without it."""
    import warnings

    def run(warm_up: bool) -> np.ndarray:
        model = make_model()
        with streamspec.watch(model, ["a", "b"], rank=3, live=False) as mon:
            for i, (real, fake, groups) in enumerate(batches(3)):
                if i == 0 and not warm_up:
                    continue
                mon.label(groups)
                scores = model(torch.cat([real, fake]).requires_grad_(True))
                if i == 0:
                    with mon.paused():
                        scores.sum().backward()
                    model.zero_grad()
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("error", streamspec.StreamspecWarning)
                    scores.sum().backward()
                model.zero_grad()
            assert mon.step == 2
        return mon.to_xarray().sigma.values

    with_warm_up, without = run(True), run(False)
    assert np.isfinite(without[:, :, :, :, 0]).all()
    np.testing.assert_array_equal(with_warm_up, without)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_a_step_whose_whole_backward_is_paused_leaves_nothing_to_the_next_step(
    reentrant: bool,
) -> None:
    """A warm-up step: the forward outside the block, its whole backward inside it. Its forward
    was left to the next step as a labelled batch and as calls that never folded: with reentrant
    checkpointing the next step's recomputed layers were left unrecorded (NaN, a warning about
    several labelled batches). Now the next steps record what a run without the warm-up step
    records."""

    assert_warm_up_leaves_nothing(lambda: CheckpointedCritic(reentrant=reentrant))


@pytest.mark.parametrize("every", [1, 2])
def test_an_attack_on_the_steps_own_forward_inside_paused_leaves_the_step_as_an_unwatched_attack(
    every: int,
) -> None:
    """FGSM on the step's own first forward (outside the block), its input gradient taken inside
    it, then the step on the adversarial batch: the first forward's calls are spent by the
    paused backward, and the step records what a run whose attack used an unwatched copy
    records (a tied GRU too: its tying spectrum needs the step's calls exactly)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    def run(watched_attack: bool) -> tuple[np.ndarray, np.ndarray]:
        torch.manual_seed(0)
        model = Net()
        twin = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        gen = torch.Generator().manual_seed(3)
        with streamspec.watch(model, ["a", "b"], rank=2, live=False, tied=True, every=every) as mon:
            for _ in range(4):
                x, y = torch.randn(12, 5, 4, generator=gen), torch.randint(0, 3, (12,))
                mon.label(torch.arange(12) % 2)
                x = x.requires_grad_(True)
                logits = (model if watched_attack else twin)(x)
                with mon.paused():
                    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), x)
                x_adv = (x + 0.1 * grad.sign()).detach()
                opt.zero_grad()
                nn.functional.cross_entropy(model(x_adv), y).backward()
                opt.step()
            assert mon.step == 4
            ds = mon.to_xarray()
        return ds.sigma.values, ds.sigma_tied.values

    watched, unwatched = run(True), run(False)
    assert np.isfinite(unwatched[0][::every, :, :, :, 0]).all()
    assert np.isfinite(unwatched[1][::every, :2, :, 0]).all()  # the GRU's two matrices
    for a, b in zip(watched, unwatched, strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_input_gradient_probe_with_retain_graph_inside_paused_leaves_the_step_as_it_was() -> (
    None
):
    """A paused ``autograd.grad(loss, a, retain_graph=True)`` reaching one of a module's two
    calls (a siamese GRU), then the step's backward of the same graph: the records are those of
    the step without the probe (counting the probed call as spent folded the GRU in two parts,
    whose tying spectra do not combine: NaN)."""

    class Siamese(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.rnn = nn.GRU(4, 8, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([self.rnn(a)[0][:, -1], self.rnn(b)[0][:, -1]], 1))

    def run(probe: bool) -> tuple[np.ndarray, np.ndarray]:
        model = Siamese()
        gen = torch.Generator().manual_seed(3)
        with streamspec.watch(model, ["a", "b"], rank=2, live=False, tied=True) as mon:
            for _ in range(3):
                a = torch.randn(12, 5, 4, generator=gen).requires_grad_(True)
                b = torch.randn(12, 5, 4, generator=gen)
                mon.label(torch.arange(12) % 2)
                loss = model(a, b).pow(2).mean()
                if probe:
                    with mon.paused():
                        torch.autograd.grad(loss, a, retain_graph=True)
                loss.backward()
            ds = mon.to_xarray()
        return ds.sigma.values, ds.sigma_tied.values

    probed, plain = run(True), run(False)
    assert np.isfinite(plain[1][:, :2, :, 0]).all()  # the GRU's two matrices
    for a, b in zip(probed, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_spent_labelling_in_force_is_not_credited_with_a_recomputed_forward() -> None:
    """Batch A through a reentrant-checkpointed body only, batch B labelled next and its
    forward's backward run inside paused() (spent): A's body, recomputed in the step's backward
    under B's labels, is left unrecorded with a warning, never credited to B's groups (with
    only A's labelling counted, it was, silently)."""

    def run(probe: bool) -> np.ndarray:
        model = CheckpointedCritic(reentrant=True)
        gen = torch.Generator().manual_seed(1)
        g_a, g_b = torch.arange(20) % 2, (torch.arange(20) >= 10).long()
        with streamspec.watch(model, ["a", "b"], rank=3, live=False) as mon:
            for _ in range(2):
                x_a = torch.randn(20, 6, generator=gen).requires_grad_(True)
                x_b = torch.randn(20, 6, generator=gen).requires_grad_(True)
                mon.label(g_a)
                features = checkpoint(model.body, x_a, use_reentrant=True)
                if probe:
                    mon.label(g_b)
                    out = model(x_b)
                    with mon.paused():
                        out.sum().backward()
                    model.zero_grad()
                features.pow(2).sum().backward()
                model.zero_grad()
        return mon.to_xarray().sigma.values

    with pytest.warns(streamspec.StreamspecWarning, match="recomputed inside the backward"):
        probed = run(True)
    plain = run(False)
    body = probed[:, :1]  # body.0 (the head is not in A's step)
    assert np.isfinite(plain[:, :1, :, :, 0]).all()
    assert np.isnan(body).all(), "A's body credited to B's labels"


def test_a_warm_up_step_of_a_wholly_checkpointed_model_leaves_nothing_to_the_next_step() -> None:
    """Every watched layer inside one reentrant checkpoint: the warm-up step's forward captures
    nothing (it runs without grad), its recomputation runs inside the paused backward; its
    labelling was left to the next step as a second batch, whose layers were then all
    unrecorded (the step not even written)."""

    class Whole(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.body, x, use_reentrant=True)

    assert_warm_up_leaves_nothing(Whole)
