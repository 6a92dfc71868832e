"""RNN/LSTM/GRU: the stepwise twin equals the fused module; recorded spectra equal exact ones."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import streamspec
from streamspec.capture.recurrent import RecurrentFamily
from streamspec.testing.reference import masked_loss_gradients
from tests.conftest import relative_errors

# One table of test problems: id → (class, extra constructor arguments).
KINDS = {
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
    "lstm": (nn.LSTM, {}),
    "gru": (nn.GRU, {}),
    "lstm_proj": (nn.LSTM, {"proj_size": 3}),
}
IN, HIDDEN, STEPS, BATCH = 5, 6, 4, 10
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning")  # CPU fallback


def make_rnn(kind: str, *, seed: int = 0, **kwargs: object) -> nn.RNNBase:
    torch.manual_seed(seed)
    cls, extra = KINDS[kind]
    kwargs = {"num_layers": 2, **extra, **kwargs}
    return cls(IN, HIDDEN, **kwargs)


def twin_of(module: nn.Module) -> nn.Module:
    return RecurrentFamily.make_stepwise(module, lambda m, caps: None, parent=module, name="")


def flat(result: tuple) -> list[torch.Tensor]:
    """``(output, h_n)`` or ``(output, (h_n, c_n))`` → a list of tensors."""
    output, hidden = result
    return [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def assert_equivalent(fused: nn.Module, twin: nn.Module, *inputs: object) -> None:
    """Outputs, final states and every parameter gradient of ``twin`` equal ``fused``'s."""
    got, want = flat(twin(*inputs)), flat(fused(*inputs))
    assert len(got) == len(want)
    weights = [torch.randn_like(w) for w in want]  # a loss touching every output and state
    for out, ref in zip(got, want, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    sum((o * w).sum() for o, w in zip(got, weights, strict=True)).backward()
    sum((o * w).sum() for o, w in zip(want, weights, strict=True)).backward()
    for (name, p), q in zip(twin.named_parameters(), fused.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_twin_equals_fused(kind: str, bidirectional: bool, batch_first: bool) -> None:
    module = make_rnn(kind, bidirectional=bidirectional, batch_first=batch_first)
    fused = copy.deepcopy(module)
    twin = twin_of(module)
    assert isinstance(twin, type(fused)) and twin.batch_first == batch_first
    x = torch.randn((BATCH, STEPS, IN) if batch_first else (STEPS, BATCH, IN))
    assert_equivalent(fused, twin, x)


@pytest.mark.parametrize("kind", list(KINDS))
def test_twin_with_initial_state_no_bias_and_unbatched_input(kind: str) -> None:
    module = make_rnn(kind, bias=False, bidirectional=True)
    fused, twin = copy.deepcopy(module), twin_of(module)
    out = 3 if kind == "lstm_proj" else HIDDEN
    h0 = torch.randn(4, BATCH, out, requires_grad=True)
    c0 = torch.randn(4, BATCH, HIDDEN, requires_grad=True)
    hx = (h0, c0) if kind.startswith("lstm") else h0
    assert_equivalent(fused, twin, torch.randn(STEPS, BATCH, IN), hx)
    # An unbatched [T, in] input is one sample, as in PyTorch.
    assert_equivalent(fused, twin, torch.randn(STEPS, IN))


def _user_hook(module: nn.Module, inputs: object, output: object) -> None:
    pass  # module level: a pickled module carries its hooks


def test_twin_shares_parameters_and_leaves_the_original_alone() -> None:
    module = make_rnn("lstm")
    module.register_forward_hook(_user_hook)
    before = {k: (type(v), copy.copy(v)) for k, v in module.__dict__.items()}
    twin = twin_of(module)
    assert twin._parameters is module._parameters
    assert all(p is q for p, q in zip(twin.parameters(), module.parameters(), strict=True))
    assert list(twin.state_dict()) == list(module.state_dict())
    assert len(twin._forward_hooks) == 1  # user hooks still fire on the twin …
    twin.register_forward_hook(_user_hook)
    assert len(module._forward_hooks) == 1  # … and nothing leaks back
    twin.eval()  # one training flag for both
    assert not module.training
    after = {k: (type(v), v) for k, v in module.__dict__.items()}
    assert after.keys() == before.keys()  # no attribute attached to the user's module
    # deepcopy / pickle give a plain, unwatched module of the original class
    for clone in (copy.deepcopy(twin), _save_load(twin)):
        assert type(clone) is nn.LSTM and not clone.training
        assert list(clone.state_dict()) == list(module.state_dict())
        assert all(
            p is not q and torch.equal(p, q)
            for p, q in zip(clone.parameters(), module.parameters(), strict=True)
        )


def _save_load(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


class Tagger(nn.Module):
    """A recurrent encoder and a linear head on the time-averaged outputs; input ``[B, T, in]``."""

    def __init__(self, kind: str, **kwargs: object) -> None:
        super().__init__()
        self.rnn = make_rnn(kind, **kwargs)
        width = (self.rnn.proj_size or HIDDEN) * (2 if self.rnn.bidirectional else 1)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bf = self.rnn.batch_first
        out, _ = self.rnn(x if bf else x.transpose(0, 1))
        return self.head((out if bf else out.transpose(0, 1)).mean(1))


def batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(BATCH, STEPS, IN, generator=gen)
        y = torch.randint(0, 3, (BATCH,), generator=gen)
        g = torch.randint(-1, 2, (BATCH,), generator=gen)
        yield x, y, g


def weight_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if n.startswith("rnn.weight_")]


@pytest.mark.parametrize(
    ("kind", "bidirectional", "batch_first", "frozen_ih"),
    [
        ("rnn_tanh", False, False, False),
        ("rnn_relu", True, True, False),
        ("lstm", True, True, False),
        ("gru", True, False, False),
        ("lstm_proj", True, False, False),
        # the first layer's input projection without a gradient: W_hh captured step by step
        ("lstm", True, False, True),
        ("gru", False, True, True),
    ],
)
def test_gradient_spectra_equal_masked_loss_gradients(
    kind, bidirectional, batch_first, frozen_ih
) -> None:
    model = Tagger(kind, bidirectional=bidirectional, batch_first=batch_first)
    if frozen_ih:
        for name, p in model.rnn.named_parameters():
            if name.startswith(("weight_ih_l0", "bias_ih_l0")):
                p.requires_grad_(False)
    names = [n for n in weight_names(model) if model.get_parameter(n).requires_grad]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    exact = []  # per step: [layer, group, rank]
    rank = 8
    with streamspec.watch(model, ["a", "b"], rank=rank, live=False, normalize="sum") as mon:
        assert [n for n in mon.layers if n.startswith("rnn.")] == names
        for x, y, g in batches(3):
            reference = Tagger(kind, bidirectional=bidirectional, batch_first=batch_first)
            reference.load_state_dict(model.state_dict())
            losses = nn.functional.cross_entropy(reference(x), y, reduction="none") / BATCH
            grads = masked_loss_gradients(reference, losses, g, 2, names=names)
            exact.append(
                [
                    [_bounded(grads[c][n], int((g == c).sum()) * STEPS, rank) for c in (0, 1)]
                    for n in names
                ]
            )
            mon.label(g)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ds = mon.to_xarray()
    got = ds["sigma"].sel(kind="gradient", layer=names).values  # [step, layer, group, rank]
    assert relative_errors(got, np.array(exact)).max() < 1e-2


def _bounded(matrix: torch.Tensor, rows: int, rank: int) -> np.ndarray:
    """float64 σ of ``matrix``, NaN beyond its rank bound ``min(rows, shape)`` (as recorded)."""
    out = np.full(rank, np.nan)
    if rows == 0:
        return out
    s = torch.linalg.svdvals(matrix.detach().double()).numpy()
    keep = min(rows, *matrix.shape, rank)
    out[:keep] = s[:keep]
    return out


def unrolled_lstm(
    x: torch.Tensor, lstm: nn.LSTM
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Independent float64 one-layer LSTM: outputs ``[B, T, H]``, ``h_{t−1}`` and gate
    pre-activations ``[B, 4H]`` per step (kept, to differentiate the loss by them)."""
    w_ih, w_hh, b_ih, b_hh = (p.detach().double().requires_grad_() for p in lstm.parameters())
    h = x.new_zeros(x.shape[0], lstm.hidden_size)
    c = torch.zeros_like(h)
    outputs, previous, gates = [], [], []
    for t in range(x.shape[1]):
        pre = x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        previous.append(h)
        gates.append(pre)
        i, f, g, o = pre.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs, 1), previous, gates


def test_lstm_activation_and_adjoint_spectra_equal_exact_stacked_rows() -> None:
    model = Tagger("lstm", num_layers=1, batch_first=True)
    x, y, g = next(batches(1, seed=3))
    # The reference, on float64 copies; first checked against the fused module itself.
    xd = x.double()
    out, previous, gates = unrolled_lstm(xd, model.rnn)
    torch.testing.assert_close(out.float(), model.rnn(x)[0], atol=1e-5, rtol=1e-5)
    head = copy.deepcopy(model.head).double()
    loss = nn.functional.cross_entropy(head(out.mean(1)), y)
    adjoints = torch.autograd.grad(loss, gates)  # ∂L/∂(gate pre-activations), per step
    rows = {
        "rnn.weight_ih_l0": (xd.transpose(0, 1), adjoints),  # x_t
        "rnn.weight_hh_l0": (torch.stack(previous), adjoints),  # h_{t−1}, h_{−1} = 0
    }
    rank = 6
    with streamspec.watch(model, ["a", "b"], rank=rank, live=False, normalize="sum") as mon:
        mon.label(g)
        nn.functional.cross_entropy(model(x), y).backward()
        ds = mon.to_xarray()
    for name, (activation, adjoint) in rows.items():
        exact = np.full((3, 2, rank), np.nan)
        for c in (0, 1):
            mask = g == c
            a = activation[:, mask].reshape(-1, activation.shape[-1])  # [T·n_c, h_in]
            d = torch.stack(adjoint)[:, mask].reshape(-1, 4 * HIDDEN)  # [T·n_c, 4H]
            for k, m in enumerate((a, d, a.T @ d)):
                exact[k, c] = _bounded(m, a.shape[0], rank)
        got = ds["sigma"].sel(layer=name).values[0]  # [kind, group, rank]
        assert relative_errors(got, exact).max() < 1e-2, name


def test_watch_swaps_in_place_and_restores_on_close() -> None:
    model = Tagger("gru", bidirectional=True)
    original = model.rnn
    keys = list(model.state_dict())
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before watch()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    start = [p.detach().clone() for p in model.parameters()]
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        assert model.rnn is not original and isinstance(model.rnn, nn.GRU)
        assert list(model.state_dict()) == keys
        for x, y, g in batches(3):
            mon.label(g)
            for m, o in ((model, opt), (plain, plain_opt)):
                o.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
                o.step()
        model.eval()
    assert model.rnn is original and type(model.rnn) is nn.GRU
    assert not original.training  # eval() during watch reached the original
    assert list(model.state_dict()) == keys
    for p, q, p0 in zip(model.parameters(), plain.parameters(), start, strict=True):
        assert not torch.equal(p, p0)  # the optimizer updated the shared weights
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert mon.to_xarray().sizes["step"] == 3


def test_no_grad_evaluation_uses_the_fused_kernel_and_records_nothing() -> None:
    model = Tagger("lstm", bidirectional=True)
    x, y, g = next(batches(1))
    want = model(x)
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        mon.label(g)
        with torch.no_grad():
            torch.testing.assert_close(model(x), want)
        assert mon.step == 0
        nn.functional.cross_entropy(model(x), y).backward()
        assert mon.step == 1


def test_packed_sequence_is_refused_with_grad_and_runs_without() -> None:
    model = nn.Sequential(make_rnn("lstm"))
    x = torch.randn(STEPS, 3, IN)
    packed = pack_padded_sequence(x, torch.tensor([4, 3, 2]))
    with streamspec.watch(model, ["a"], rank=2, live=False) as mon:
        mon.label([0, 0, 0])
        with pytest.raises(streamspec.StreamspecError, match="PackedSequence.*pad_packed_sequence"):
            model(packed)
        with torch.no_grad():
            model(packed)


def test_frozen_weights_are_skipped() -> None:
    model = Tagger("rnn_tanh")
    model.rnn.weight_hh_l1.requires_grad_(False)
    with streamspec.watch(model, ["a"], rank=2, live=False) as mon:
        assert "rnn.weight_hh_l1" not in mon.layers and "rnn.weight_hh_l0" in mon.layers
        x, y, _ = next(batches(1))
        mon.label(torch.zeros(BATCH, dtype=torch.long))
        nn.functional.cross_entropy(model(x), y).backward()
        ds = mon.to_xarray()
    assert np.isfinite(ds["sigma"].sel(layer="rnn.weight_hh_l0").values[0, :, 0, 0]).all()


def test_two_monitors_on_one_model_both_record() -> None:
    model = Tagger("lstm")
    original = model.rnn
    x, y, g = next(batches(1))
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as outer:
        with streamspec.watch(model, ["a", "b"], rank=2, live=False) as inner:
            outer.label(g)
            inner.label(g)
            nn.functional.cross_entropy(model(x), y).backward()
            got = [
                m.to_xarray()["sigma"].sel(layer="rnn.weight_hh_l0").values for m in (outer, inner)
            ]
        assert isinstance(model.rnn, nn.LSTM) and model.rnn is not original
    assert model.rnn is original
    np.testing.assert_array_equal(got[0], got[1])
    assert np.isfinite(got[0][0, :, :, 0]).all()


def test_tied_spectra_of_an_lstm_follow_the_time_steps() -> None:
    """sigma_tied of weight_ih: σ of the [T, h_in·h_out] matrix of per-time-step contributions."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    model = Net()
    x = torch.randn(5, 6, 3)
    labels = torch.tensor([0, 1, 0, 1, 1])
    with streamspec.watch(model, ["a", "b"], rank=3, normalize="sum", tied=True, live=False) as mon:
        mon.label(labels)
        model(x).pow(2).sum().backward()
        ds = mon.to_xarray()
    # Reference: per-time-step gradients of weight_ih from an unrolled copy (autograd).
    reference = Net()
    reference.load_state_dict(model.state_dict())
    w = reference.rnn.weight_ih_l0
    for c in range(2):
        xc = x[labels == c]
        h = torch.zeros(len(xc), 4)
        cell = torch.zeros(len(xc), 4)
        gates_in = []
        for t in range(6):
            gi = xc[:, t] @ w.T
            gi.retain_grad()
            gates_in.append(gi)
            gates = (
                gi
                + reference.rnn.bias_ih_l0
                + h @ reference.rnn.weight_hh_l0.T
                + reference.rnn.bias_hh_l0
            )
            i, f, g, o = gates.chunk(4, dim=1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(cell)
        reference.head(h).pow(2).sum().backward()
        rows = torch.stack(
            [(xc[:, t].T.double() @ gates_in[t].grad.double()).reshape(-1) for t in range(6)]
        )
        exact = torch.linalg.svdvals(rows).numpy()[:3]
        got = ds["sigma_tied"].sel(layer="rnn.weight_ih_l0").values[0, c]
        np.testing.assert_allclose(got, exact, rtol=1e-4)
    assert np.isnan(ds["sigma_tied"].sel(layer="head.weight").values).all()


def test_two_monitors_on_one_lstm_both_record_and_close_in_any_order() -> None:
    """Two open monitors on one recurrent module (a notebook cell run twice): both record the
    same spectra; closing them in either order leaves the original module in place."""
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 5, batch_first=True)
    model = nn.Sequential(lstm)
    x, labels = torch.randn(4, 7, 6), torch.arange(4) % 2
    for order in ((0, 1), (1, 0)):
        monitors = [streamspec.watch(model, ["a", "b"], rank=2, live=False) for _ in range(2)]
        for _ in range(2):
            for mon in monitors:
                mon.label(labels)
            model[0](x)[0].pow(2).mean().backward()
        sigma = [mon.to_xarray()["sigma"].values for mon in monitors]
        np.testing.assert_allclose(sigma[0], sigma[1], rtol=1e-6)
        assert np.isfinite(sigma[0][..., 0]).all()
        for i in order:
            monitors[i].close()
        assert model[0] is lstm


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_twin_backward_work_is_linear_in_the_sequence_length(kind: str) -> None:
    """The twin's backward allocates O(T) elements, not O(T²): indexing the all-steps input
    projection once per time step made each step's backward zero-fill and add a whole
    ``[T, B, G·H]`` gradient (an LSTM over 200 steps trained ≈ 4× slower on a CPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Written(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Written.elements += t.numel()
            return out

    def backward_elements(steps: int) -> int:
        twin = twin_of(make_rnn(kind, num_layers=1))
        output = flat(twin(torch.randn(steps, BATCH, IN)))[0]
        Written.elements = 0
        with Written():
            output.sum().backward()
        return Written.elements

    short, long = backward_elements(16), backward_elements(128)
    assert long < 12 * short, (long, short)  # 8× the steps: ≈ 8× the work (quadratic: ≈ 30×)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_unrecorded_steps_run_the_fused_kernel(kind: str, monkeypatch) -> None:
    """With ``every=3`` the twin runs step by step only on the recorded steps (the others take
    the fused kernel, as fast as the plain module) and the records are those of a run stepping
    through every step; the step count stays right with the RNN the only watched module."""
    from streamspec.capture import recurrent

    def run(always_stepwise: bool) -> tuple[np.ndarray, list[int], int]:
        torch.manual_seed(0)
        model = nn.Sequential(make_rnn(kind, num_layers=1, batch_first=True))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        calls = []
        stepwise = recurrent._Stepwise._stepwise_forward

        def spy(self, *args):  # type: ignore[no-untyped-def]
            calls.append(1)
            return stepwise(self, *args)

        with monkeypatch.context() as patch:
            patch.setattr(recurrent._Stepwise, "_stepwise_forward", spy)
            if always_stepwise:
                patch.setattr(recurrent, "_records", lambda sink: True)
            with streamspec.watch(model, ["a", "b"], rank=4, every=3, live=False) as mon:
                gen = torch.Generator().manual_seed(1)
                for _ in range(7):
                    mon.label(torch.arange(BATCH) % 2)
                    out, _ = model(torch.randn(BATCH, STEPS, IN, generator=gen))
                    opt.zero_grad()
                    out.square().mean().backward()
                    opt.step()
                ds = mon.to_xarray()
        return ds["sigma"].values, ds["step"].values.tolist(), len(calls)

    sigma, steps, stepwise_calls = run(always_stepwise=False)
    reference, reference_steps, all_calls = run(always_stepwise=True)
    assert steps == reference_steps == [0, 3, 6]
    assert (stepwise_calls, all_calls) == (3, 7)
    np.testing.assert_allclose(sigma, reference, rtol=1e-4, atol=1e-6)
