"""The Monitor's contract: steps, labels, hooks, archive, errors — on small real models."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest
import scipy.stats
import torch
import xarray as xr
from torch import nn

import streamspec
from streamspec.testing.reference import ExactRecorder
from tests.conftest import relative_errors, run_digits


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))


def train(
    model: nn.Module, mon, steps: int = 6, batch: int = 12, *, seed: int = 0, rec=None
) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        x = torch.randn(batch, 10, generator=gen)
        y = torch.randint(0, 4, (batch,), generator=gen)
        g = torch.randint(-1, 2, (batch,), generator=gen)
        if mon is not None:
            mon.label(g)
        if rec is not None:
            rec.label(g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_training_with_and_without_monitor_gives_identical_weights() -> None:
    plain, watched = mlp(), mlp()
    rng_before = torch.get_rng_state()
    train(plain, None)
    rng_plain = torch.get_rng_state()
    torch.set_rng_state(rng_before)
    with streamspec.watch(watched, ["a", "b"], rank=3, live=False) as mon:
        train(watched, mon)
    assert torch.equal(torch.get_rng_state(), rng_plain)  # the global RNG was never consumed
    for p, q in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(p, q)


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_no_hooks_left_after_close_and_close_twice() -> None:
    model = mlp()
    mon = streamspec.watch(model, ["a", "b"], rank=2, live=False)
    assert hook_count(model) == 2
    train(model, mon, steps=2)
    mon.close()
    mon.close()
    assert hook_count(model) == 0
    with pytest.raises(streamspec.StreamspecError, match="closed"):
        mon.label([0])


def test_exception_inside_with_leaves_readable_archive(tmp_path) -> None:
    model = mlp()
    path = tmp_path / "run.zarr"
    with (
        pytest.raises(RuntimeError, match="boom"),
        streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False) as mon,
    ):
        train(model, mon, steps=5)
        mon.label(torch.zeros(12, dtype=torch.long))
        model(torch.randn(12, 10)).sum().backward()  # completed step 5
        raise RuntimeError("boom")
    assert hook_count(model) == 0
    ds = streamspec.open(path).to_xarray()
    assert ds.sizes["step"] == 6
    assert ds.sizes["epoch"] == 1  # the partial epoch was finalised
    present = ds["count"].values > 0  # [step, group]
    sigma1 = ds["sigma"].values[..., 0].transpose(0, 3, 1, 2)  # [step, group, layer, kind]
    assert np.isfinite(sigma1[present]).all() and np.isnan(sigma1[~present]).all()


def test_labels_of_wrong_length_raise_at_forward() -> None:
    model = mlp()
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        mon.label([0, 1, 1])
        with pytest.raises(streamspec.StreamspecError, match=r"3 samples.*batch of 5"):
            model(torch.randn(5, 10))


def test_forward_without_labels_raises() -> None:
    model = mlp()
    with (
        streamspec.watch(model, ["a"], rank=2, live=False),
        pytest.raises(streamspec.StreamspecError, match="mon.label"),
    ):
        model(torch.randn(5, 10))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ([0.5, 1.0], "integer"),
        (torch.tensor([0.0, 1.0]), "dtype"),
        ([0, 2], r"\[0, 1\] or -1"),
        ([-2, 0], r"\[0, 1\] or -1"),
        ([[0, 1]], "1-D"),
        (["a", "b"], "integer"),
        (torch.zeros(2, dtype=torch.long, device="meta"), "meta device"),
        (np.array([2**63, 1], dtype=np.uint64), r"\[9223372036854775808\]"),
    ],
)
def test_bad_labels(labels, match) -> None:
    with (
        streamspec.watch(mlp(), ["a", "b"], rank=2, live=False) as mon,
        pytest.raises(streamspec.StreamspecError, match=match),
    ):
        mon.label(labels)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"groups": ["a"], "rank": 0}, "rank"),
        ({"groups": ["a"], "rank": 2.0}, "rank"),
        ({"groups": [], "rank": 2}, "at least one group"),
        ({"groups": "ab", "rank": 2}, "sequence"),
        ({"groups": ["a", "b", "a"], "rank": 2}, r"duplicates \['a'\]"),
        ({"groups": ["a"], "rank": 2, "every": 0}, "every"),
        ({"groups": ["a"], "rank": 2, "normalize": "max"}, "normalize"),
    ],
)
def test_bad_watch_arguments(kwargs, match) -> None:
    with pytest.raises(streamspec.StreamspecError, match=match):
        streamspec.watch(mlp(), live=False, **kwargs)


def test_model_without_supported_layer_says_what_was_found() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.LayerNorm(3))
    with pytest.raises(
        streamspec.StreamspecError, match=r"Conv1d.*BatchNorm1d|BatchNorm1d.*Conv1d"
    ):
        streamspec.watch(model, ["a"], rank=2, live=False)


def test_frozen_layers_are_skipped() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    with streamspec.watch(model, ["a"], rank=2, live=False) as mon:
        assert mon.layers == ("2.weight",)


def test_existing_store_needs_resume_and_resume_continues(tmp_path) -> None:
    path = tmp_path / "run.zarr"
    model = mlp()
    with streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False) as mon:
        train(model, mon, steps=3)
        mon.end_epoch()
    with pytest.raises(streamspec.StreamspecError, match=r"resume=True") as info:
        streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False)
    assert str(path) in str(info.value)
    with pytest.raises(streamspec.StreamspecError, match="groups"):
        streamspec.watch(model, ["a", "c"], rank=2, store=path, live=False, resume=True)
    with streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False, resume=True) as mon:
        assert (mon.step, mon.epoch) == (3, 1)
        train(model, mon, steps=2)
    ds = streamspec.open(path).to_xarray()
    assert ds["step"].values.tolist() == [0, 1, 2, 3, 4]
    assert ds["step_epoch"].values.tolist() == [0, 0, 0, 1, 1]
    assert ds["epoch"].values.tolist() == [0, 1]


def test_every_records_every_nth_step_and_eval_records_nothing() -> None:
    model = mlp()
    with streamspec.watch(model, ["a", "b"], rank=2, every=3, live=False) as mon:
        train(model, mon, steps=7)
        with torch.no_grad():
            model(torch.randn(100, 10))  # evaluation: other batch size, no labels needed
        train(model, mon, steps=2, seed=1)
        ds = mon.to_xarray()
    assert ds["step"].values.tolist() == [0, 3, 6]
    assert mon.step == 9


def test_nan_is_recorded_with_one_warning_and_training_continues() -> None:
    model = mlp()
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        x = torch.randn(12, 10)
        x[0, 0] = float("nan")
        mon.label(torch.zeros(12, dtype=torch.long))
        with pytest.warns(streamspec.StreamspecWarning, match="NaN/Inf.*0.weight"):
            model(x).sum().backward()
            mon.flush()
        train(model, mon, steps=2)  # no second warning for the same layer (-W error would raise)
        ds = mon.to_xarray()
    assert np.isnan(ds["sigma"].values[0, 0, :, 0]).all()
    assert np.isfinite(ds["sigma"].values[1:, 0, 0, 0, 0]).all()


def test_inplace_activation_shared_module_and_sequences_match_reference() -> None:
    """(B, T, h) inputs, a module called twice per step, an in-place ReLU after a watched layer."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu_(self.shared(x))
            h = self.shared(h)  # second call of the same module in the step
            return self.head(h).mean(dim=1)

    model = Net()
    rec = ExactRecorder(model, check_weight_grads=True)
    with streamspec.watch(model, ["a", "b"], rank=4, live=False) as mon:
        for _step in range(3):
            x = torch.randn(5, 7, 6)
            g = torch.tensor([0, 1, 0, -1, 1])
            mon.label(g)
            rec.label(g)
            model(x).pow(2).sum().backward()
            model.zero_grad()
        ds = mon.to_xarray()
    sigma = ds["sigma"].values
    for s in range(3):
        for li, name in enumerate(ds["layer"].values):
            for c in range(2):
                exact = rec.spectra([s], str(name), c, 4)
                errs = relative_errors(sigma[s, li, :, c], exact)
                assert errs.max() < 1e-4, (s, name, c, errs.max())


def test_batch_dim_one_for_sequence_first_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    rec = ExactRecorder(model, batch_dim=1)
    with streamspec.watch(model, ["a", "b"], rank=3, batch_dim=1, live=False) as mon:
        x = torch.randn(9, 4, 4)  # [T, B, h]
        g = torch.tensor([0, 1, 1, 0])
        mon.label(g)
        rec.label(g)
        model(x).sum().backward()
        ds = mon.to_xarray()
    for c in range(2):
        exact = rec.spectra([0], "weight", c, 3)
        assert relative_errors(ds["sigma"].values[0, 0, :, c], exact).max() < 1e-5


def test_exact_route_factorises_each_shape_once_per_step(monkeypatch) -> None:
    """Small groups take the exact route: the host factorises all layers and groups of one row
    shape in one batched call per step (not a Python loop of SVDs holding the GIL per layer and
    group), and every value equals the exact spectrum."""
    from streamspec import pipeline

    calls: list[tuple[int, ...]] = []
    real = pipeline.exact_spectra
    monkeypatch.setattr(
        pipeline, "exact_spectra", lambda a, d: calls.append(a.shape + d.shape[-1:]) or real(a, d)
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    rec = ExactRecorder(model)
    g = torch.tensor([0, 1, 2, 0, 1, 2])
    with streamspec.watch(model, ["a", "b", "c"], rank=2, live=False) as mon:
        mon.label(g)
        rec.label(g)
        model(torch.randn(6, 8)).pow(2).sum().backward()
        ds = mon.to_xarray()
    # the two 8 → 8 layers × 3 groups in one call, the 8 → 3 head's 3 groups in another
    assert sorted(calls) == [(3, 2, 8, 3), (6, 2, 8, 8)], calls
    layers = [str(n) for n in ds["layer"].values]
    for name in rec.names:
        for c in range(3):
            exact = rec.spectra([0], name, c, 2)
            got = ds["sigma"].values[0, layers.index(name), :, c]
            assert relative_errors(got, exact).max() < 1e-5, (name, c)


class _SequenceFirstClassifier(nn.Module):
    """A sequence-first encoder (``[T, B, d]``, as before ``batch_first``) under a batch-first
    head on the mean over positions (``[B, d]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=0))


def test_batch_dim_mapping_for_a_model_mixing_layouts() -> None:
    """``batch_dim={"encoder": 1}``: the sequence-first encoder's layers (attention's out_proj and
    the feed-forward Linears) take samples from dim 1, the head from dim 0; every recorded σ
    equals the exact spectrum of its group's rows (T ≠ B, so a wrong dim cannot pass)."""
    torch.manual_seed(0)
    model = _SequenceFirstClassifier()
    layout = {"encoder": 1}
    rec = ExactRecorder(model, batch_dim=layout)
    with streamspec.watch(model, ["a", "b"], rank=3, batch_dim=layout, live=False) as mon:
        x = torch.randn(7, 6, 8)  # [T, B, d]
        g = torch.tensor([0, 1, 1, 0, 1, 0])
        mon.label(g)
        rec.label(g)
        model(x).pow(2).sum().backward()
        ds = mon.to_xarray()
    layers = [str(n) for n in ds["layer"].values]
    checked = 0
    for name in rec.names:
        li = layers.index(name)
        for c in range(2):
            exact = rec.spectra([0], name, c, 3)
            errs = relative_errors(ds["sigma"].values[0, li, :, c], exact)
            assert errs.max() < 1e-4, (name, c, errs.max())
            checked += 1
    assert checked == 8  # out_proj, linear1, linear2, head × 2 groups
    # The attention's in-projection (its twin follows the module's own batch_first): its
    # activation rows are the encoder's input rows of the group's samples.
    li = layers.index("encoder.self_attn.in_proj_weight")
    for c in range(2):
        rows = x[:, g == c].transpose(0, 1).reshape(-1, 8).double()
        exact = torch.linalg.svdvals(rows)[:3].numpy() / np.sqrt(int((g == c).sum()))
        assert relative_errors(ds["sigma"].values[0, li, 0, c], exact).max() < 1e-4
    # One dim for the whole model cannot fit both parts.
    for wrong in (0, 1):
        with (
            pytest.raises(streamspec.StreamspecError),
            streamspec.watch(model, ["a", "b"], rank=3, batch_dim=wrong, live=False) as mon,
        ):
            mon.label(g)
            model(x).pow(2).sum().backward()


class _BatchFirstAroundSequenceFirstAttention(nn.Module):
    """A batch-first model (``[N, L, E]``) around an ``nn.MultiheadAttention(batch_first=False)``;
    ``encoder.0`` is also registered as ``shared.0`` (one module, two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=False)
        self.encoder = nn.Sequential(nn.Linear(8, 8))
        self.shared = nn.Sequential(self.encoder[0])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.transpose(0, 1)
        h = self.attn(s, s, s, need_weights=False)[0].transpose(0, 1)
        return self.head(self.shared(h).mean(dim=1))


def test_attention_out_proj_takes_its_modules_layout_whatever_batch_dim_says() -> None:
    """MultiheadAttention's out_proj is fed in the module's own layout (sequence-first here), so
    it takes that layout's sample dim even under the default ``batch_dim=0``: with N == L a wrong
    dim would pass every shape check and silently record another grouping."""
    torch.manual_seed(0)
    model = _BatchFirstAroundSequenceFirstAttention()
    rec = ExactRecorder(model, batch_dim={"attn": 1})  # the truth: out_proj's rows are [L, N, E]
    x, g = torch.randn(6, 6, 8), torch.tensor([0, 1, 1, 0, 1, 0])
    with streamspec.watch(model, ["a", "b"], rank=3, live=False, exact_rows=10_000) as mon:
        mon.label(g)
        rec.label(g)
        model(x).pow(2).sum().backward()
        ds = mon.to_xarray()
    layers = [str(n) for n in ds["layer"].values]
    for name in ("attn.out_proj.weight", "encoder.0.weight", "head.weight"):
        for c in range(2):
            got = ds["sigma"].values[0, layers.index(name), :, c]
            assert relative_errors(got, rec.spectra([0], name, c, 3)).max() < 1e-4, (name, c)


def test_batch_dim_mapping_of_shared_modules_and_typos(tmp_path) -> None:
    """A shared module's second name is a valid key; names mapping one module to two dims are
    refused; a refused mapping leaves no archive behind, so the corrected call just works."""
    model = _BatchFirstAroundSequenceFirstAttention()
    with streamspec.watch(model, ["a", "b"], rank=2, batch_dim={"shared.0": 0}, live=False):
        pass
    with pytest.raises(streamspec.StreamspecError, match="same dim"):
        streamspec.watch(model, ["a", "b"], rank=2, batch_dim={"shared": 1}, live=False)
    store = tmp_path / "run.zarr"
    with pytest.raises(streamspec.StreamspecError, match="no such module"):
        streamspec.watch(model, ["a", "b"], rank=2, batch_dim={"encodr": 1}, store=store)
    assert not store.exists()
    with streamspec.watch(model, ["a", "b"], rank=2, batch_dim={"encoder": 0}, store=store):
        pass


def test_a_label_mismatch_at_a_layer_with_its_own_layout_names_it() -> None:
    """An LSTM reads samples where its own batch_first puts them, a convolution from dim 0: the
    error does not point at ``batch_dim``, which cannot change that."""
    for model, x in (
        (nn.Sequential(nn.LSTM(4, 5)), torch.randn(7, 5, 4)),  # sequence-first: 5 on dim 1
        (nn.Sequential(nn.Conv1d(3, 4, 3)), torch.randn(5, 3, 8)),  # 5 samples on dim 0
    ):
        with streamspec.watch(model, ["a", "b"], rank=2, live=False, batch_dim=1) as mon:
            mon.label(torch.tensor([0, 1, 0, 1]))
            with pytest.raises(streamspec.StreamspecError) as info:
                out = model(x)
                (out[0] if isinstance(out, tuple) else out).sum().backward()
        assert "own layout" in str(info.value) and "batch_dim" not in str(info.value)


class _SharedConvolution(nn.Module):
    """One convolution under a mapped (sequence-first) part and an unmapped one."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv1d(4, 4, 1)
        self.encoder = nn.ModuleDict({"conv": conv, "proj": nn.Linear(4, 4)})
        self.decoder = nn.ModuleDict({"conv": conv})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 4, T]
        s = self.encoder["proj"](self.encoder["conv"](x).permute(2, 0, 1))  # [T, B, 4]
        return self.decoder["conv"](s.permute(1, 2, 0))


def test_a_shared_convolution_is_not_refused_over_a_batch_dim_it_ignores() -> None:
    """Convolutions always take samples from dim 0, so names of one mapped to different dims
    are no conflict."""
    model = _SharedConvolution()
    with streamspec.watch(model, ["a", "b"], rank=2, live=False, batch_dim={"encoder": 1}) as mon:
        mon.label(torch.tensor([0, 1, 0]))
        model(torch.randn(3, 4, 5)).pow(2).sum().backward()
        ds = mon.to_xarray()
    assert np.isfinite(ds["sigma"].values[0, :, 0, :, 0]).all()


def test_batch_dim_mapping_is_validated() -> None:
    model = _SequenceFirstClassifier()
    for bad, word in (({"encodr": 1}, "no such module"), ({"encoder": "1"}, "mapping")):
        with pytest.raises(streamspec.StreamspecError, match=word):
            streamspec.watch(model, ["a", "b"], rank=2, batch_dim=bad, live=False)
    with pytest.raises(streamspec.StreamspecError, match="mapping"):
        streamspec.watch(model, ["a", "b"], rank=2, batch_dim=1.0, live=False)
    # The longest matching prefix wins; "" covers the whole model.
    from streamspec.capture.registry import as_batch_dim, batch_dim_of

    dims = as_batch_dim({"": 1, "encoder.linear1": 0, "encoder": 2})
    assert batch_dim_of("head", dims) == 1
    assert batch_dim_of("encoder.linear2", dims) == 2
    assert batch_dim_of("encoder.linear1", dims) == 0
    assert batch_dim_of("encoder2", dims) == 1  # a name prefix, not a string prefix


def test_welch_in_archive_equals_scipy_on_archived_sigma(digits_default) -> None:
    ds = digits_default.ds
    sigma = ds["sigma"].values.astype(np.float64)
    step_epoch = ds["step_epoch"].values
    pairs = [str(p) for p in ds["pair"].values]
    groups = [str(g) for g in ds["group"].values]
    checked = 0
    for e in range(ds.sizes["epoch"]):
        rows = sigma[step_epoch == e]
        for pi, pair in enumerate(pairs):
            a, b = (groups.index(x) for x in pair.split(" vs "))
            with np.errstate(all="ignore"):
                ref = scipy.stats.ttest_ind(
                    rows[:, :, :, a], rows[:, :, :, b], axis=0, equal_var=False, nan_policy="omit"
                )
            t = ds["welch_t"].values[e, :, :, pi]
            p = ds["welch_p"].values[e, :, :, pi]
            ref_t, ref_p = np.asarray(ref.statistic, float), np.asarray(ref.pvalue, float)
            both = np.isfinite(ref_t)
            assert np.array_equal(both, np.isfinite(t))
            tol = 1e-6 * np.maximum(1, np.abs(ref_t[both]))
            assert np.all(np.abs(t[both] - ref_t[both]) <= tol)
            assert np.all(np.abs(p[both] - ref_p[both]) <= tol)
            checked += int(both.sum())
    assert checked > 500


def test_planted_difference_is_found_and_null_is_nominal() -> None:
    """Group 1's inputs ×1.5: first layer activation σ₁ differs; random groups: nominal rate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    gen = torch.Generator().manual_seed(0)
    with streamspec.watch(model, ["ctrl", "case"], rank=4, live=False) as mon:
        for _ in range(40):
            x = torch.randn(32, 8, generator=gen)
            g = torch.arange(32) % 2
            x[g == 1] *= 1.5
            mon.label(g)
            model(x).pow(2).mean().backward()
        mon.end_epoch()
        ds = mon.to_xarray()
    assert ds["welch_p"].values[0, 0, 0, 0, 0] < 1e-10

    # Null: groups drawn at random from one distribution; every layer × kind × rank is a test.
    p_values = []
    for seed in range(6):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        gen = torch.Generator().manual_seed(100 + seed)
        with streamspec.watch(model, ["a", "b"], rank=4, live=False, seed=seed) as mon:
            for _ in range(30):
                x = torch.randn(32, 8, generator=gen)
                mon.label(torch.randperm(32, generator=gen) % 2)
                model(x).pow(2).mean().backward()
            mon.end_epoch()
            p_values.append(mon.to_xarray()["welch_p"].values[0, :, :, 0, :1].ravel())
    p = np.concatenate(p_values)
    rate = np.mean(p < 0.05)
    assert rate <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / p.size) + 0.05, rate


def test_in_memory_and_open_zarr_give_the_same_variables(tmp_path) -> None:
    path = tmp_path / "a.zarr"
    run = run_digits(path, epochs=1, n_samples=256, record=False)
    on_disk = xr.open_zarr(path, consolidated=False)
    in_memory = run_digits(None, epochs=1, n_samples=256, record=False).ds
    for ds in (on_disk, in_memory, run.ds):
        assert set(ds.data_vars) == {
            "sigma",
            "sigma_err",
            "count",
            "sigma_epoch",
            "welch_t",
            "welch_p",
        }
        assert {"step", "step_epoch", "epoch", "layer", "kind", "group", "rank", "pair"} <= set(
            ds.coords
        )
        assert ds["sigma"].dims == ("step", "layer", "kind", "group", "rank")
        assert list(ds["kind"].values) == ["activation", "adjoint", "gradient"]
    np.testing.assert_array_equal(on_disk["sigma"].values, in_memory["sigma"].values)
    assert (
        run.ds.attrs["rank"] == 8
        and run.ds.attrs["normalize"] == "mean"
        and run.ds.attrs["model"] == "Sequential"
    )


def test_step_without_grouped_samples_is_recorded_as_nan() -> None:
    model = mlp()
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        train(model, mon, steps=1)
        mon.label(torch.full((12,), -1))
        model(torch.randn(12, 10)).sum().backward()
        train(model, mon, steps=1)
        ds = mon.to_xarray()
    assert ds["step"].values.tolist() == [0, 1, 2]
    assert ds["count"].values[1].tolist() == [0, 0]
    assert np.isnan(ds["sigma"].values[1]).all()


def test_count_and_normalisation() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    rec = ExactRecorder(model)
    with streamspec.watch(model, ["a", "b", "c"], rank=4, normalize="sum", live=False) as mon:
        g = torch.tensor([0, 0, 0, 1, -1, 1])
        mon.label(g)
        rec.label(g)
        model(torch.randn(6, 5)).sum().backward()
        ds = mon.to_xarray()
    assert ds["count"].values.tolist() == [[3, 2, 0]]
    assert np.isnan(ds["sigma"].values[0, 0, :, 2]).all()  # empty group
    assert np.isnan(ds["sigma"].values[0, 0, 0, 1, 2:]).all()  # beyond rank bound min(2 rows, 5)
    exact = rec.spectra([0], "weight", 0, 4, normalize="sum")
    assert relative_errors(ds["sigma"].values[0, 0, :, 0], exact).max() < 1e-5


def test_step_sketches_never_use_the_global_rng_and_are_seeded() -> None:
    a, b = (
        run_digits(
            None,
            epochs=1,
            n_samples=128,
            batch_size=128,
            record=False,
            groups=("x", "y"),
            label_fn=lambda y: y % 2,
            exact_rows=0,
        )
        for _ in range(2)
    )
    np.testing.assert_array_equal(a.ds["sigma_epoch"].values, b.ds["sigma_epoch"].values)


def test_the_order_in_which_layers_first_draw_does_not_change_their_test_matrices() -> None:
    """A model spread over devices runs each device's hooks on a thread of its own: which layer
    draws its random test matrices first must not matter (one shared generator made Ω depend on
    the threads' interleaving)."""

    def omegas(order: list[int]) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        with streamspec.watch(model, ["a", "b"], rank=4, live=False, seed=3) as mon:
            trackers = mon._trackers
            for i in order:
                trackers[i]._setup(torch.device("cpu"))
            return [t.omega(side).clone() for t in trackers for side in ("in", "out")]

    forward, backward = omegas([0, 1]), omegas([1, 0])
    assert not torch.equal(forward[0], forward[2])  # random, and not the same for both layers
    for x, y in zip(forward, backward, strict=True):
        assert torch.equal(x, y)


def test_deepcopy_of_a_watched_model_is_plain_and_not_recorded() -> None:
    import copy

    model = mlp()
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        train(model, mon, steps=2)
        best = copy.deepcopy(model)  # e.g. keeping the best model mid-training
        best(torch.randn(3, 10)).sum().backward()  # other batch size: not watched, no error
        train(model, mon, steps=1)
        assert mon.step == 3
    for p, q in zip(model.parameters(), best.parameters(), strict=True):
        assert p.shape == q.shape


def _replicate(module: nn.Module) -> nn.Module:
    """What ``torch.nn.parallel.replicate`` (``nn.DataParallel``'s forward) makes for each GPU,
    without GPUs: copies sharing the module's hooks and parameters, marked ``_is_replica``."""
    replica = module._replicate_for_data_parallel()
    for name, param in module._parameters.items():
        setattr(replica, name, param)
    for name, child in module._modules.items():
        if child is not None:
            replica._modules[name] = _replicate(child)
    return replica


@pytest.mark.parametrize("monitors", [1, 2])
@pytest.mark.parametrize("family", ["linear", "lstm", "attention"])
def test_data_parallel_replicas_are_not_recorded_and_warned_about_once(
    family: str, monitors: int
) -> None:
    """nn.DataParallel runs copies of the watched modules: nothing is recorded, which used to go
    unsaid (plain layers) or stop training with a bare StopIteration (stepwise modules); with two
    monitors, the first took a stepwise replica's calls for its twin's (a usage error on the
    replica's share of the batch). One warning per monitor."""
    torch.manual_seed(0)
    if family == "linear":
        model: nn.Module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        x = torch.randn(8, 4)
    else:
        layer = nn.LSTM(4, 8, batch_first=True)
        if family == "attention":
            layer = nn.MultiheadAttention(4, 2, batch_first=True)
        model, x = nn.Sequential(layer), torch.randn(8, 5, 4)

    def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if family == "linear":
            return m(x)
        return m[0](x)[0] if family == "lstm" else m[0](x, x, x)[0]

    with contextlib.ExitStack() as stack:
        mons = [
            stack.enter_context(streamspec.watch(model, ["a", "b"], rank=2, live=False))
            for _ in range(monitors)
        ]
        for mon in mons:
            mon.label(torch.arange(8) % 2)
        with pytest.warns(streamspec.StreamspecWarning, match="DataParallel") as record:
            for half in (x[:4], x[4:]):  # one replica per GPU, each its part of the batch
                forward(_replicate(model), half).pow(2).sum().backward()
        assert len(record) == monitors
        assert [mon.step for mon in mons] == [0] * monitors
        forward(model, x).pow(2).sum().backward()  # the model itself is watched as ever
        assert [mon.step for mon in mons] == [1] * monitors


def test_resume_of_an_unfinished_epoch_rebuilds_its_welch_state(tmp_path) -> None:
    """Welch of an epoch split by a resume equals Welch of the same steps in one session."""
    path = tmp_path / "run.zarr"
    model = mlp()
    mon = streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False)
    train(model, mon, steps=4)
    mon.flush()
    # Simulate a crash: drop the monitor without close(); the archive holds 4 committed steps.
    mon._remove_hooks()
    mon._pipeline.close()
    mon._writer.close()
    with streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False, resume=True) as mon2:
        assert (mon2.step, mon2.epoch) == (4, 0)
        train(model, mon2, steps=3, seed=1)
    ds = streamspec.open(path).to_xarray()
    assert ds.sizes["step"] == 7 and ds["step_epoch"].values.tolist() == [0] * 7
    sigma = ds["sigma"].values.astype(np.float64)
    with np.errstate(all="ignore"):
        ref = scipy.stats.ttest_ind(
            sigma[..., 0, :], sigma[..., 1, :], axis=0, equal_var=False, nan_policy="omit"
        )
    got = ds["welch_t"].values[0, :, :, 0]
    np.testing.assert_allclose(got, np.asarray(ref.statistic), rtol=1e-6)


def test_step_activations_are_freed_without_the_cycle_collector() -> None:
    """No reference cycle through the hooks: a step's activations die with its graph."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    seen: list[weakref.ref] = []
    # The watched layer's output carries the monitor's tensor hook: it must not be kept alive.
    model[2].register_forward_hook(lambda m, i, o: seen.append(weakref.ref(o)))
    gc.disable()
    try:
        with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
            for _ in range(3):
                mon.label(torch.tensor([0, 1, 0, 1]))
                model(torch.randn(4, 4)).sum().backward()
            assert all(r() is None for r in seen), "captured activations outlived their step"
    finally:
        gc.enable()


def test_a_nan_step_does_not_poison_later_steps() -> None:
    """Warm blocks keep their last good value: spectra recover on the next finite step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 2))
    gen = torch.Generator().manual_seed(0)
    with streamspec.watch(model, ["a", "b"], rank=2, live=False, exact_rows=0) as mon:
        for step in range(6):
            x = torch.randn(64, 40, generator=gen)
            if step == 2:
                x[0, 0] = float("nan")
            mon.label(torch.arange(64) % 2)
            if step == 2:
                with pytest.warns(streamspec.StreamspecWarning, match="NaN"):
                    model(x).pow(2).mean().backward()
                    mon.flush()
            else:
                model(x).pow(2).mean().backward()
        ds = mon.to_xarray()
    sigma = ds["sigma"].values[:, 0, 0, :, 0]  # [step, group] activation σ₁ of the first layer
    assert np.isnan(sigma[2, 0]) and np.isfinite(sigma[3:]).all()


@pytest.mark.parametrize("batch", [64, 16], ids=["sketched", "exact"])
def test_an_overflowing_step_is_left_out_of_the_epoch(batch) -> None:
    """An fp16-AMP-style overflow (a huge loss scale: finite rows, overflowing float32 products)
    leaves the epoch's spectra as if the step had not happened (it made all of them NaN)."""

    def run(overflow: bool) -> xr.Dataset:
        model = mlp_wide()
        gen = torch.Generator().manual_seed(1)
        with streamspec.watch(model, ["a", "b"], rank=3, live=False) as mon:
            for step in range(7):
                x = torch.randn(batch, 40, generator=gen)
                mon.label(torch.arange(batch) % 2)
                if step != 4:
                    model(x).pow(2).mean().backward()
                elif overflow:  # the reference run skips step 4
                    (model(x).pow(2).mean() * 3e38).backward()
                model.zero_grad()
            mon.end_epoch()
            return mon.to_xarray()

    if batch == 64:  # sketched: the step's own spectra come from the overflowed products
        with pytest.warns(streamspec.StreamspecWarning, match="NaN/Inf"):
            overflowed = run(overflow=True)
        assert not np.isfinite(overflowed["sigma"].values[4, 1, 1]).all()
    else:  # exact: from the (finite) rows in float64 on the host; the float32 sketches overflow
        overflowed = run(overflow=True)
        assert np.isfinite(overflowed["sigma"].values[4, 1, 1, :, :2]).all()  # rank ≤ 2 there
    reference = run(overflow=False)
    got, expected = overflowed["sigma_epoch"].values, reference["sigma_epoch"].values
    assert np.isfinite(expected[..., 0]).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=0)


def mlp_wide() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 2))


@pytest.mark.parametrize("exact_rows", [0, None], ids=["sketched", "exact"])
def test_grad_scaler_adjoints_are_those_of_the_loss_itself(exact_rows) -> None:
    """``scaler.scale(loss).backward()`` multiplies Δ and G by a scale that doubles as training
    goes; with ``grad_scaler=`` the records equal an unscaled run's (powers of two: exact)."""

    def run(scaler: torch.amp.GradScaler | None, tell: bool) -> np.ndarray:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 2))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        kwargs = {"grad_scaler": scaler} if tell else {}
        with streamspec.watch(
            model, ["a", "b"], rank=2, live=False, exact_rows=exact_rows, **kwargs
        ) as mon:
            for _ in range(6):
                mon.label(torch.arange(16) % 2)
                loss = model(torch.randn(16, 40, generator=gen)).pow(2).mean()
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                opt.zero_grad()
            return mon.to_xarray()["sigma"].values

    def scaler() -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)

    plain = run(None, tell=False)
    np.testing.assert_allclose(run(scaler(), tell=True), plain, rtol=1e-5)
    ratio = run(scaler(), tell=False)[:, 0, :, 0, 0] / plain[:, 0, :, 0, 0]  # [step, kind]
    np.testing.assert_allclose(ratio[:, 0], 1, rtol=1e-5)  # activations: unaffected
    np.testing.assert_allclose(ratio[:, 1], 2.0 ** (16 + np.arange(6) // 2), rtol=1e-5)


def test_grad_scaler_must_be_a_grad_scaler() -> None:
    with pytest.raises(streamspec.StreamspecError, match="GradScaler"):
        streamspec.watch(mlp(), ["a"], rank=2, live=False, grad_scaler=2.0**16)


def test_an_exception_caught_during_backward_does_not_stall_recording() -> None:
    model = mlp()
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        train(model, mon, steps=2)

        def explode(grad: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("out of memory (simulated)")

        mon.label(torch.zeros(12, dtype=torch.long))
        out = model(torch.randn(12, 10))
        out.register_hook(explode)
        with pytest.raises(RuntimeError, match="simulated"):
            out.sum().backward()
        train(model, mon, steps=3, seed=1)  # the user skips the batch and goes on
        assert mon.step == 5
        assert mon.to_xarray().sizes["step"] == 5


def test_a_failed_watch_leaves_the_model_as_it_was(tmp_path) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    model = Net()
    original = model.rnn
    path = tmp_path / "run.zarr"
    streamspec.watch(model, ["a"], rank=2, store=path, live=False).close()
    with pytest.raises(streamspec.StreamspecError, match="resume=True"):
        streamspec.watch(model, ["a"], rank=2, store=path, live=False)
    assert model.rnn is original and hook_count(model) == 0
    model(torch.randn(2, 5, 3)).sum().backward()  # plain training works
    with pytest.raises(streamspec.StreamspecError, match="seed"):
        streamspec.watch(model, ["a"], rank=2, store=tmp_path / "b.zarr", seed="x", live=False)
    assert not (tmp_path / "b.zarr").exists()


def test_sketches_stay_float32_under_autocast() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 2))
    x = torch.randn(64, 40)
    labels = torch.arange(64) % 2
    out = {}
    for autocast in (False, True):
        with streamspec.watch(model, ["a", "b"], rank=4, live=False, exact_rows=0) as mon:
            for _ in range(3):  # later steps use the warm blocks the step's end updated
                mon.label(labels)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    # backward inside the context, as training loops commonly do: the autocast
                    # state then reaches the monitor's hooks and its end-of-backward callback
                    model(x).float().pow(2).mean().backward()
            out[autocast] = mon.to_xarray()["sigma"].values[:, 0, 0]  # first layer, activation
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                mon.end_epoch()  # the next epoch's Ω: also device work
            # The step's and the epoch's ends (in the same autocast state) keep the blocks
            # orthonormal, as the host's spectra assume (bf16 there: off by ≈ 1.5e-3).
            for tracker in mon._trackers:
                for side in ("in", "out"):
                    block = torch.cat([tracker.omega(side), tracker.warm(side)], dim=-1).double()
                    eye = torch.eye(block.shape[-1], dtype=torch.float64)
                    assert (block.mT @ block - eye).abs().max() < 1e-5
        model.zero_grad()
    # The activations are the same float32 inputs either way: the sketch must not drop to bf16.
    np.testing.assert_allclose(out[True], out[False], rtol=1e-4)


def test_profiler_ranges_only_while_a_profiler_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """``streamspec.fold``/``streamspec.end_step`` ranges show in a profile (bench's breakdown),
    and the hot path enters no ``record_function`` otherwise (tens of µs per layer and step)."""
    from streamspec import monitor as monitor_module

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x, labels = torch.randn(6, 8), torch.arange(6) % 2
    entered: list[str] = []
    real = monitor_module.record_function

    def counting(name: str) -> object:
        entered.append(name)
        return real(name)

    monkeypatch.setattr(monitor_module, "record_function", counting)
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        mon.label(labels)
        model(x).sum().backward()
        assert entered == []
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            mon.label(labels)
            model(x).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert {"streamspec.fold", "streamspec.end_step"} <= names
    assert entered.count("streamspec.fold") == 2 and entered.count("streamspec.end_step") == 1


def test_torch_save_of_a_watched_model_loads_as_a_plain_model(tmp_path) -> None:
    """``torch.save(model)`` mid-run (whole-model checkpoints) used to fail on the monitor's
    thread lock. The saved model loads with plain fused modules and inert hooks, computes what
    the watched one computes, and the watch goes on recording."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(
        nn.TransformerEncoder(layer, 1, enable_nested_tensor=False),
        nn.Linear(16, 4),
        nn.LSTM(4, 4, batch_first=True),
    )
    x, labels = torch.randn(4, 5, 16), torch.arange(4) % 2
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        mon.label(labels)
        model(x)[0].pow(2).mean().backward()
        torch.save(model, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
        assert type(loaded[0].layers[0].self_attn) is nn.MultiheadAttention
        assert type(loaded[2]) is nn.LSTM
        mon.label(labels)
        watched = model(x)[0]
        watched.pow(2).mean().backward()
        torch.testing.assert_close(loaded(x)[0], watched.detach())
        ds = mon.to_xarray()
    assert ds.sizes["step"] == 2 and np.isfinite(ds["sigma"].values[1, :, :, :, 0]).all()


def test_records_where_torch_cannot_tell_autocast_per_device(monkeypatch) -> None:
    """Before PyTorch 2.4 ``torch.is_autocast_enabled`` took no device type: the monitor then
    switches autocast off as before instead of stopping at the first step."""
    from streamspec.sketch import device

    def old_signature(*args: object) -> bool:
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments but 1 was given")
        return torch.is_autocast_enabled()

    monkeypatch.setattr(device, "_is_autocast_enabled", old_signature)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x, labels = torch.randn(6, 8), torch.arange(6) % 2
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        for _ in range(2):
            mon.label(labels)
            model(x).sum().backward()
        ds = mon.to_xarray()
    assert ds.sizes["step"] == 2 and np.isfinite(ds["sigma"].values[..., 0]).all()


def test_a_saved_or_copied_attention_twin_keeps_what_was_set_on_it(tmp_path) -> None:
    """Attributes set on a watched MultiheadAttention (its twin) during the watch survive
    ``copy.deepcopy`` and ``torch.save`` of the model, which yield the plain module."""
    import copy

    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    with streamspec.watch(model, ["a", "b"], rank=2, live=False):
        model[0].dropout = 0.5
        model[0].eval()
        torch.save(model, tmp_path / "m.pt")
        for other in (copy.deepcopy(model), torch.load(tmp_path / "m.pt", weights_only=False)):
            assert type(other[0]) is nn.MultiheadAttention
            assert other[0].dropout == 0.5 and not other[0].training


def test_an_unbatched_input_names_the_module() -> None:
    """A Linear called on one unbatched sample: a usage error naming the module, what it
    expected, what it got and how to fix it (not a shape error deep in a hook)."""
    import pytest

    from streamspec import StreamspecError

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        mon.label(torch.tensor([0, 1]))
        model(torch.randn(2, 4))  # batched: fine
        with pytest.raises(StreamspecError) as err:
            model[2](torch.randn(4))
    text = str(err.value)
    assert text.startswith("at 2.weight: expected a batched input to nn.Linear"), text
    assert "shape (4,)" in text and "Fix:" in text


def test_batched_layer_products_record_what_layer_by_layer_products_record(monkeypatch) -> None:
    """``STREAMSPEC_BATCH_LAYERS=3``: a bank's sketched-route products run three layers at a
    time (the fourth, and a shorter layer's call pattern, alone at the end of the backward),
    their rows gathered straight into one buffer (no stacking copy); the recorded step and epoch
    spectra, error estimates and t-statistics are those of the layer-by-layer products, and a
    model's exact-route and first (seeding) steps are unchanged. So are they when the batch's
    rows are stacked by a copy (rows gathered on their own)."""
    from streamspec import monitor as monitor_module

    calls: list[int] = []  # batches through one buffer (layers each)
    copied: list[int] = []  # batches stacked by a copy
    runs: list[int] = []  # queue lengths run
    real_stacked = monitor_module.stacked_products
    real_copied = monitor_module.products_of_layers
    real_run = monitor_module.Monitor._run_queue

    def stacked(trackers, a, d, counts):  # type: ignore[no-untyped-def]
        calls.append(len(trackers))
        return real_stacked(trackers, a, d, counts)

    def copied_products(trackers, *args):  # type: ignore[no-untyped-def]
        copied.append(len(trackers))
        return real_copied(trackers, *args)

    def run_queue(self, key):  # type: ignore[no-untyped-def]
        runs.append(len(self._queued.get(key, [])))
        return real_run(self, key)

    monkeypatch.setattr(monitor_module, "stacked_products", stacked)
    monkeypatch.setattr(monitor_module, "products_of_layers", copied_products)
    monkeypatch.setattr(monitor_module.Monitor, "_run_queue", run_queue)
    out = {}
    for batch in ("1", "3", "side", "3-copied"):
        # "side": STREAMSPEC_SIDE_STREAM on a CPU (no streams there: the hook's own thread
        # runs them): each layer alone, through the same queue as batches. "3-copied": no
        # buffer slots (each layer's rows gathered on their own, then stacked).
        with monkeypatch.context() as patch:
            if batch == "3-copied":
                patch.setattr(monitor_module.Monitor, "_slot", lambda self, *args: None)
            patch.setenv("STREAMSPEC_BATCH_LAYERS", "1" if batch == "side" else batch[0])
            patch.setenv("STREAMSPEC_SIDE_STREAM", "1" if batch == "side" else "0")
            calls.clear()
            copied.clear()
            runs.clear()
            torch.manual_seed(0)
            model = nn.Sequential(*[nn.Linear(40, 40) for _ in range(4)], nn.Linear(40, 8))
            gen = torch.Generator().manual_seed(1)
            with streamspec.watch(model, ["a", "b"], rank=4, live=False, exact_rows=0) as mon:
                for _epoch in range(2):
                    for _ in range(3):
                        x = torch.randn(48, 40, generator=gen)
                        mon.label(torch.arange(48) % 2)
                        model(x).pow(2).mean().backward()
                    mon.end_epoch()
                ds = mon.to_xarray()
        out[batch] = [ds[v].values for v in ("sigma", "sigma_err", "sigma_epoch", "welch_t")]
        # Batched: from the second step on, the four 40 × 40 layers as 3 + 1 (the one left
        # at the end of the backward runs alone, without stacking; the head is a bank of its
        # own and never batched).
        assert calls == ([3] * 5 if batch == "3" else []), calls
        assert copied == ([3] * 5 if batch == "3-copied" else []), copied
        # Through the queue: 5 steps after the seeding one; per step, "3": the four layers as
        # 3 + 1 (the head's bank of one is not queued); "side": each of the five layers alone.
        queued = {"1": [], "3": [3, 1] * 5, "side": [1] * 25, "3-copied": [3, 1] * 5}[batch]
        assert [n for n in runs if n] == queued, runs
    for a, b, c, d in zip(out["1"], out["3"], out["side"], out["3-copied"], strict=True):
        assert np.isfinite(a).any()
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6 * np.nanmax(np.abs(a)))
        np.testing.assert_array_equal(c, a)
        np.testing.assert_array_equal(d, b)


def test_a_bank_smaller_than_the_batch_runs_in_its_own_hooks(monkeypatch) -> None:
    """``STREAMSPEC_BATCH_LAYERS=4`` on banks of one and two layers: each runs once all its
    layers are there, in the backward, not at its end (they held their rows through the whole
    backward, the first layer's longest)."""
    from streamspec import monitor as monitor_module

    monkeypatch.setenv("STREAMSPEC_BATCH_LAYERS", "4")
    monkeypatch.setenv("STREAMSPEC_SIDE_STREAM", "0")  # (with it, the head is queued too)
    runs: list[tuple[int, bool]] = []  # (queue length, at the step's end)
    at_end = [False]
    real_run, real_end = monitor_module.Monitor._run_queue, monitor_module.Monitor._end_step

    def run_queue(self, key):  # type: ignore[no-untyped-def]
        if self._queued.get(key):
            runs.append((len(self._queued[key]), at_end[0]))
        return real_run(self, key)

    def end_step(self):  # type: ignore[no-untyped-def]
        at_end[0] = True
        try:
            return real_end(self)
        finally:
            at_end[0] = False

    monkeypatch.setattr(monitor_module.Monitor, "_run_queue", run_queue)
    monkeypatch.setattr(monitor_module.Monitor, "_end_step", end_step)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 40), nn.Linear(40, 30))
    with streamspec.watch(model, ["a", "b"], rank=4, live=False, exact_rows=0) as mon:
        for _ in range(3):
            mon.label(torch.arange(48) % 2)
            model(torch.randn(48, 40)).pow(2).mean().backward()
    # From the second step on: the two 40 × 40 layers together, in the first one's hook (the
    # head, a bank of one, is not queued without a side stream).
    assert runs == [(2, False)] * 2, runs


def test_batched_rows_of_a_failed_backward_are_released_by_end_epoch_and_close(
    monkeypatch,
) -> None:
    """``STREAMSPEC_BATCH_LAYERS``: a backward that raises mid-way (caught by the user) leaves
    layers' gathered rows in their bank's queue; ``end_epoch()`` and ``close()`` drop that dead
    step (as ``label()`` does), so a closed monitor pins no rows."""
    monkeypatch.setenv("STREAMSPEC_BATCH_LAYERS", "4")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(6)])

    def boom(grad: torch.Tensor) -> None:
        raise RuntimeError("boom")

    def failing_step(mon: streamspec.Monitor) -> None:
        mon.label(torch.arange(12) % 2)
        x = model[:3](torch.randn(12, 5, 32))
        x.register_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            model[3:](x).pow(2).mean().backward()

    for finish in ("end_epoch", "close"):
        mon = streamspec.watch(model, ["a", "b"], rank=4, live=False)
        mon.label(torch.arange(12) % 2)
        model(torch.randn(12, 5, 32)).pow(2).mean().backward()  # seeds: batched from now on
        failing_step(mon)
        assert mon._queued, "the dead step's rows are queued (the test's premise)"
        getattr(mon, finish)()
        assert not mon._queued
        mon.close()


def test_batched_rows_held_per_bank_stay_within_batch_bytes(monkeypatch) -> None:
    """A bank's queue runs before a layer's rows would take it past ``BATCH_BYTES`` (its rows
    and the slots of its batch buffer not filled yet), with room for one and a half layers (no
    buffer: each layer alone) and for two and a half (buffers of two slots)."""
    from streamspec import monitor as monitor_module

    monkeypatch.setenv("STREAMSPEC_BATCH_LAYERS", "4")
    held: list[int] = []
    buffers: list[int] = []  # slots of each buffer opened
    real, real_slot = monitor_module.Monitor._run_queue, monitor_module.Monitor._slot

    def run_queue(self, key):  # type: ignore[no-untyped-def]
        rows = sum(q.rows.nbytes + q.adjoint.nbytes for q in self._queued.get(key, []))
        held.append(rows + (self._open[key].free_bytes if key in self._open else 0))
        return real(self, key)

    def slot(self, *args):  # type: ignore[no-untyped-def]
        out = real_slot(self, *args)
        if out is not None and out[1] == 0:
            buffers.append(len(out[0].rows))
        return out

    monkeypatch.setattr(monitor_module.Monitor, "_run_queue", run_queue)
    monkeypatch.setattr(monitor_module.Monitor, "_slot", slot)
    # One layer's rows: A and Δ [3, 20, 32] float32, 15360 bytes.
    for layers, slots in ((1.5, []), (2.5, [2, 2] * 2)):
        cap = int(layers * 15360)
        monkeypatch.setattr(monitor_module, "BATCH_BYTES", cap)
        held.clear()
        buffers.clear()
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(4)])
        with streamspec.watch(model, ["a", "b", "c"], rank=4, live=False) as mon:
            for _ in range(3):
                mon.label(torch.arange(12) % 3)
                model(torch.randn(12, 5, 32)).pow(2).mean().backward()
        assert held and max(held) <= cap, (layers, held)
        assert buffers == slots, (layers, buffers)


def test_a_bank_with_rows_gathered_on_their_own_opens_no_buffer(monkeypatch) -> None:
    """A layer gathered on its own (the device's ``QUEUED_BYTES`` left no room for a buffer)
    waits in its bank: the bank's next layers are not given a buffer on top of it (the batch is
    stacked by a copy anyway), so the bank never holds more than ``BATCH_BYTES``; and the
    records are those of layer-by-layer products."""
    from streamspec import monitor as monitor_module

    class Mixed(nn.Module):
        """Backward order B1, A1, B2, A2, A3, A4 (A: a bank of four 40 → 40 layers, B: two
        40 → 120)."""

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.ModuleList([nn.Linear(40, 40) for _ in range(4)])
            self.b = nn.ModuleList([nn.Linear(40, 120) for _ in range(2)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a[3](x).tanh()
            h = self.a[2](h).tanh()
            h = self.a[1](h).tanh()
            h = self.b[1](h)[..., :40].tanh()
            h = self.a[0](h).tanh()
            return self.b[0](h)

    size = 2 * 24 * (40 + 40) * 4  # one A layer's rows
    held: list[int] = []
    real = monitor_module.Monitor._run_queue

    def run_queue(self, key):  # type: ignore[no-untyped-def]
        rows = sum(q.rows.nbytes + q.adjoint.nbytes for q in self._queued.get(key, []))
        held.append(rows + (self._open[key].free_bytes if key in self._open else 0))
        return real(self, key)

    monkeypatch.setattr(monitor_module.Monitor, "_run_queue", run_queue)
    out = {}
    for batch in ("1", "4"):
        monkeypatch.setenv("STREAMSPEC_BATCH_LAYERS", batch)
        with monkeypatch.context() as patch:
            if batch == "4":
                patch.setattr(monitor_module, "BATCH_BYTES", 4 * size)
                patch.setattr(monitor_module, "QUEUED_BYTES", 5 * size)
            held.clear()
            torch.manual_seed(0)
            model = Mixed()
            gen = torch.Generator().manual_seed(1)
            with streamspec.watch(model, ["a", "b"], rank=4, live=False, exact_rows=0) as mon:
                for _ in range(3):
                    mon.label(torch.arange(48) % 2)
                    model(torch.randn(48, 40, generator=gen)).pow(2).mean().backward()
                out[batch] = mon.to_xarray().sigma.values
        if batch == "4":
            assert held and max(held) <= 4 * size, [h / size for h in held]
    np.testing.assert_allclose(out["4"], out["1"], rtol=2e-4, atol=1e-6 * np.nanmax(out["1"]))


def test_batch_buffers_take_the_layers_called_in_the_step_and_padded_groups(monkeypatch) -> None:
    """A buffer takes as many slots as the bank's layers called in the step (a model that calls
    two of its six same-shape layers: two slots, none left free), and groups of unequal sizes
    (zero-padded rows) through slots record what layer-by-layer products record."""
    from streamspec import monitor as monitor_module

    class Some(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(40, 40) for _ in range(6)])

        def forward(self, x: torch.Tensor, use: int) -> torch.Tensor:
            for layer in self.layers[:use]:
                x = layer(x).tanh()
            return x

    free: list[int] = []
    stacked: list[int] = []
    real_run, real_stacked = monitor_module.Monitor._run_queue, monitor_module.stacked_products

    def run_queue(self, key):  # type: ignore[no-untyped-def]
        if key in self._open:
            free.append(len(self._open[key].rows) - self._open[key].used)
        return real_run(self, key)

    def counted(trackers, a, d, counts):  # type: ignore[no-untyped-def]
        stacked.append(len(trackers))
        return real_stacked(trackers, a, d, counts)

    monkeypatch.setattr(monitor_module.Monitor, "_run_queue", run_queue)
    monkeypatch.setattr(monitor_module, "stacked_products", counted)
    out = {}
    for batch in ("1", "4"):
        monkeypatch.setenv("STREAMSPEC_BATCH_LAYERS", batch)
        free.clear()
        stacked.clear()
        torch.manual_seed(0)
        model = Some()
        gen = torch.Generator().manual_seed(1)
        with streamspec.watch(model, ["a", "b", "c"], rank=4, live=False, exact_rows=0) as mon:
            for step in range(4):
                mon.label(torch.tensor([0] * (20 + step) + [1] * 7 + [2] * (21 - step)))
                x = torch.randn(48, 6, 40, generator=gen)
                model(x, use=2 if step % 2 else 5).pow(2).mean().backward()
            out[batch] = mon.to_xarray().sigma.values
    # Steps 1-3 (step 0 seeds): two layers as 2, five as 4 + 1 (the last gathered alone), 2.
    assert stacked == [2, 4, 2], stacked
    assert free and max(free) == 0, free
    np.testing.assert_allclose(out["4"], out["1"], rtol=2e-4, atol=1e-6 * np.nanmax(out["1"]))


def _batch_probe(monkeypatch, batch, model, run):  # type: ignore[no-untyped-def]
    """``run(mon, model)`` watched with ``STREAMSPEC_BATCH_LAYERS=batch``: the records, the
    slots of every buffer opened, the batches read from buffers, and per step the layers whose
    rows still waited at its end."""
    from streamspec import monitor as monitor_module

    monkeypatch.setenv("STREAMSPEC_BATCH_LAYERS", batch)
    opened: list[int] = []
    stacked: list[int] = []
    deferred: list[int] = []
    real_slot, real_end = monitor_module.Monitor._slot, monitor_module.Monitor._end_step
    real_stacked = monitor_module.stacked_products

    def slot(self, *args):  # type: ignore[no-untyped-def]
        out = real_slot(self, *args)
        if out is not None and out[1] == 0:
            opened.append(len(out[0].rows))
        return out

    def end_step(self):  # type: ignore[no-untyped-def]
        deferred.append(sum(1 for s in self._state if s.pending))
        return real_end(self)

    def counted(trackers, a, d, counts):  # type: ignore[no-untyped-def]
        stacked.append(len(trackers))
        return real_stacked(trackers, a, d, counts)

    with monkeypatch.context() as patch:
        patch.setattr(monitor_module.Monitor, "_slot", slot)
        patch.setattr(monitor_module.Monitor, "_end_step", end_step)
        patch.setattr(monitor_module, "stacked_products", counted)
        with streamspec.watch(model, ["a", "b"], rank=4, live=False, exact_rows=0) as mon:
            run(mon, model)
            sigma = mon.to_xarray().sigma.values
    return sigma, opened, stacked, deferred


def test_a_layer_called_twice_counts_once_for_its_banks_buffers(monkeypatch) -> None:
    """A bank's buffer expects its layers still to come, each counted once: a layer called
    twice (gathered twice, stacked by a copy) leaves its three siblings a buffer of three slots,
    one batch of three (not 2 + 1)."""

    class Again(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(40, 40) for _ in range(4)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x).tanh()
            return self.layers[3](x).tanh()

    def run(mon, model):  # type: ignore[no-untyped-def]
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            mon.label(torch.arange(48) % 2)
            model(torch.randn(48, 40, generator=gen)).pow(2).mean().backward()

    out = {}
    for batch in ("1", "4"):
        torch.manual_seed(0)
        out[batch], opened, stacked, _ = _batch_probe(monkeypatch, batch, Again(), run)
    assert (opened, stacked) == ([3, 3], [3, 3]), (opened, stacked)
    np.testing.assert_allclose(out["4"], out["1"], rtol=2e-4, atol=1e-6 * np.nanmax(out["1"]))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_layers_fold_in_their_hooks_through_batch_buffers(
    reentrant, monkeypatch
) -> None:
    """Under activation checkpointing a recomputed call counts when its gradient comes. Non-
    reentrant: the recomputed forward's calls get none (the first forward's do), so they are not
    awaited and a checkpointed layer's rows are folded in its own hook, not held until the
    step's end. Reentrant (one segment per layer, as Hugging Face checkpoints each block): the
    first forward captures nothing, and the bank's layers come one segment at a time, so a
    buffer expects all of the bank's. Both batch their four layers through one buffer and
    record what the same model without checkpointing records."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self, segment: bool) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(40, 40) for _ in range(4)])
            self.segment = segment

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                block = lambda h, layer=layer: layer(h).tanh()  # noqa: E731
                x = checkpoint(block, x, use_reentrant=reentrant) if self.segment else block(x)
            return x

    def run(mon, model):  # type: ignore[no-untyped-def]
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            mon.label(torch.arange(48) % 2)
            x = torch.randn(48, 40, generator=gen, requires_grad=reentrant)
            model(x).pow(2).mean().backward()

    out = {}
    for name, batch, segment in (("plain", "1", False), ("1", "1", True), ("4", "4", True)):
        torch.manual_seed(0)
        out[name], opened, stacked, deferred = _batch_probe(
            monkeypatch, batch, Checkpointed(segment), run
        )
        assert deferred == [0, 0, 0], (name, deferred)
        if name == "4":
            assert (opened, stacked) == ([4, 4], [4, 4]), (opened, stacked)
    top = np.nanmax(out["plain"])
    for name in ("1", "4"):
        np.testing.assert_allclose(out[name], out["plain"], rtol=2e-4, atol=1e-6 * top)


@pytest.mark.parametrize(
    "reentrant", [None, False, True], ids=["plain", "non-reentrant", "reentrant"]
)
def test_a_labelled_forward_whose_backward_never_runs_leaves_the_next_step_alone(
    reentrant, monkeypatch
) -> None:
    """A labelled forward whose backward never runs (a loss skipped as NaN), its graph dropped
    at the next forward: its calls are no longer awaited once the graph dies, so the step's
    layers fold in their own hooks (not all held to the step's end, waiting for them), and the
    records equal a run without that forward. Under reentrant checkpointing that step's
    checkpointed layers stay unrecorded (NaN), as before: its labelling still counts as a
    second batch (whether the rest of its graph lives is not known)."""
    import contextlib

    from torch.utils.checkpoint import checkpoint

    from streamspec import monitor as monitor_module

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(40, 40) for _ in range(4)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layers[0](x).tanh()
            for layer in self.layers[1:]:
                block = lambda h, layer=layer: layer(h).tanh()  # noqa: E731
                x = block(x) if reentrant is None else checkpoint(block, x, use_reentrant=reentrant)
            return x

    deferred: list[int] = []
    real_end = monitor_module.Monitor._end_step

    def end_step(self):  # type: ignore[no-untyped-def]
        deferred.append(sum(1 for s in self._state if s.pending))
        return real_end(self)

    monkeypatch.setattr(monitor_module.Monitor, "_end_step", end_step)
    out = {}
    for abandon in (False, True):
        deferred.clear()
        torch.manual_seed(0)
        model = Net()
        gen = torch.Generator().manual_seed(1)
        grad = reentrant is not None  # (reentrant checkpointing needs an input with a gradient)
        warns = (
            pytest.warns(streamspec.StreamspecWarning, match="recomputed inside the backward")
            if abandon and reentrant
            else contextlib.nullcontext()
        )
        with warns, streamspec.watch(model, ["a", "b"], rank=4, live=False, exact_rows=0) as mon:
            for step in range(4):
                x = torch.randn(48, 40, generator=gen, requires_grad=grad)
                if abandon and step == 2:
                    mon.label(torch.arange(48) % 2)
                    loss = model(torch.randn(48, 40, requires_grad=grad)).pow(2).mean()
                mon.label(torch.arange(48) % 2)
                loss = model(x).pow(2).mean()  # (the skipped loss's graph dies here)
                loss.backward()
            out[abandon] = mon.to_xarray().sigma.values
        assert deferred == [0, 0, 0, 0], (abandon, deferred)
    assert np.isfinite(out[False][..., 0]).all()
    top = np.nanmax(out[False])
    if reentrant:  # the step after the skipped forward: its checkpointed layers NaN (the next
        # step's warm blocks then differ a little from the run without the skip)
        assert np.isnan(out[True][2, 1:]).all() and np.isfinite(out[True][2, 0, ..., 0]).all()
        assert np.isfinite(out[True][3, ..., 0]).all()
        np.testing.assert_allclose(out[True][:2], out[False][:2], rtol=2e-4, atol=1e-6 * top)
    else:
        np.testing.assert_allclose(out[True], out[False], rtol=2e-4, atol=1e-6 * top)


def test_rows_held_by_all_banks_stay_within_queued_bytes(monkeypatch) -> None:
    """Banks of two shapes, each a layer short of a batch most of the backward: together they
    never hold more than ``QUEUED_BYTES`` of rows after a layer is queued (the fullest runs
    first; counting the slots of batch buffers not filled yet), and the records are those of
    layer-by-layer products."""
    from streamspec import monitor as monitor_module

    torch.manual_seed(0)
    model = nn.Sequential(
        *[m for _ in range(3) for m in (nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh())]
    )
    # Rows of one layer: A and Δ [3, 20, 32 + 64] float32, 23040 bytes; room for two.
    cap = 2 * 23040
    monkeypatch.setattr(monitor_module, "QUEUED_BYTES", cap)
    held: list[int] = []
    real = monitor_module.Monitor._queue

    def queue(self, *args):  # type: ignore[no-untyped-def]
        real(self, *args)
        free = sum(b.free_bytes for b in self._open.values())
        held.append(sum(q.size for qs in self._queued.values() for q in qs) + free)

    monkeypatch.setattr(monitor_module.Monitor, "_queue", queue)
    out = {}
    for batch in ("1", "4"):
        monkeypatch.setenv("STREAMSPEC_BATCH_LAYERS", batch)
        held.clear()
        gen = torch.Generator().manual_seed(1)
        with streamspec.watch(model, ["a", "b", "c"], rank=4, live=False) as mon:
            for _ in range(3):
                mon.label(torch.arange(12) % 3)
                model(torch.randn(12, 5, 32, generator=gen)).pow(2).mean().backward()
            out[batch] = mon.to_xarray().sigma.values
        if batch == "4":
            assert held and max(held) <= cap and cap in held, held
    assert np.isfinite(out["1"][:, :, :, :, 0]).all()
    np.testing.assert_allclose(out["4"], out["1"], rtol=2e-4, atol=1e-6 * np.nanmax(out["1"]))


def _separate_or_together(model_fn, x1, g1, x2, g2, steps=1, **watch_kwargs):  # type: ignore[no-untyped-def]
    """The records of ``label(g1); f(x1); label(g2); f(x2)`` and of one forward of both."""
    out = {}
    for how in ("separate", "together"):
        model = model_fn()
        with streamspec.watch(model, ["a", "b"], live=False, **watch_kwargs) as mon:
            for _ in range(steps):
                if how == "separate":
                    mon.label(g1)
                    y1 = model(x1)
                    mon.label(g2)
                    loss = y1.pow(2).sum() + model(x2).pow(2).sum()
                else:
                    mon.label(torch.cat([g1, g2]))
                    loss = model(torch.cat([x1, x2])).pow(2).sum()
                loss.backward()
            out[how] = mon.to_xarray()
    return out["separate"], out["together"]


@pytest.mark.parametrize("exact_rows", [None, 0], ids=["exact", "sketched"])
def test_labelled_batches_through_separate_forwards_before_one_backward(exact_rows) -> None:
    """``label(g1); model(x1); label(g2); model(x2); backward()`` (a labelled and an unlabelled
    batch, summed micro-batches): the step holds both batches' samples, as one forward of
    both would. (The counts once came from one labelling only: a group of the other batch
    vanished, and σ was normalised by the wrong counts.)"""
    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(10, 10, generator=gen), torch.randn(12, 10, generator=gen)
    g1 = torch.tensor([0] * 10)
    g2 = torch.tensor([1, 0] * 6)
    separate, together = _separate_or_together(
        mlp, x1, g1, x2, g2, steps=2, rank=4, exact_rows=exact_rows
    )
    out = {"separate": separate, "together": together}
    assert out["separate"]["count"].values.tolist() == [[16, 6], [16, 6]]
    np.testing.assert_array_equal(out["separate"]["count"], out["together"]["count"])
    sigma = out["separate"]["sigma"].values
    assert np.isfinite(sigma[..., 0]).all()
    np.testing.assert_allclose(sigma, out["together"]["sigma"].values, rtol=1e-4, atol=1e-6)


def test_a_layer_in_only_some_of_the_steps_labelled_batches_is_left_out() -> None:
    """A head applied to one of two labelled batches covers fewer samples than the step's
    counts: that layer's step is NaN (one warning), the shared layers' steps are recorded."""
    torch.manual_seed(0)
    body, head = nn.Linear(6, 6), nn.Linear(6, 2)
    model = nn.ModuleDict({"body": body, "head": head})
    with (
        pytest.warns(streamspec.StreamspecWarning, match="head.weight was called in only some"),
        streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon,
    ):
        mon.label(torch.tensor([0, 1, 0, 1]))
        y1 = head(body(torch.randn(4, 6)))
        mon.label(torch.tensor([1, 1, 0]))
        (y1.sum() + body(torch.randn(3, 6)).pow(2).sum()).backward()
        ds = mon.to_xarray()
    assert ds["count"].values.tolist() == [[3, 4]]
    assert np.isfinite(ds["sigma"].sel(layer="body.weight").values[..., 0]).all()
    assert np.isnan(ds["sigma"].sel(layer="head.weight").values).all()


@pytest.mark.parametrize("where", ["step", "epoch"])
def test_a_caught_interrupt_at_a_steps_or_epochs_end_does_not_reuse_its_index(
    where: str, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """Ctrl-C (a ``KeyboardInterrupt``) landing in the monitor's end of a step, or right after
    an epoch's record is handed to the host thread, caught by the training loop, which goes on:
    the next step (epoch) gets the next index. (It got the same one, which the host pipeline
    refused as out of order: end_epoch() and close() then raised into training, and the
    archive lost the step, or merged two epochs.)"""
    from streamspec import monitor as monitor_module
    from streamspec.pipeline import EpochRecord, HostPipeline

    fired = []
    if where == "step":
        reset = monitor_module.Monitor._reset_step

        def reset_step(self):  # type: ignore[no-untyped-def]
            reset(self)
            if self._step == 3 and not fired:
                fired.append(True)
                raise KeyboardInterrupt

        monkeypatch.setattr(monitor_module.Monitor, "_reset_step", reset_step)
    else:
        submit = HostPipeline.submit

        def submit_then_interrupt(self, item):  # type: ignore[no-untyped-def]
            submit(self, item)
            if isinstance(item, EpochRecord) and not fired:
                fired.append(True)
                raise KeyboardInterrupt

        monkeypatch.setattr(HostPipeline, "submit", submit_then_interrupt)
    model = mlp()
    gen = torch.Generator().manual_seed(0)
    with streamspec.watch(model, ["a", "b"], rank=3, store=tmp_path / "r.zarr", live=False) as mon:
        for _ in range(3):
            for _ in range(4):
                mon.label(torch.arange(8) % 2)
                with contextlib.suppress(KeyboardInterrupt):  # the loop catches it, goes on
                    model(torch.randn(8, 10, generator=gen)).pow(2).sum().backward()
            with contextlib.suppress(KeyboardInterrupt):
                mon.end_epoch()
    assert fired
    ds = streamspec.open(tmp_path / "r.zarr").to_xarray()
    assert ds["step"].values.tolist() == list(range(12))
    assert ds["step_epoch"].values.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.sizes["epoch"] == 3


def test_a_close_interrupted_while_joining_is_finished_by_the_next(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """A second Ctrl-C while close() waits for the host thread: calling close() again joins it,
    closes the writer, and every step is in the archive. (The second close() did nothing, and
    the rows not yet written were lost.)"""
    from streamspec.pipeline import HostPipeline

    join = HostPipeline.close
    calls = []

    def interrupted_once(self):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        join(self)

    monkeypatch.setattr(HostPipeline, "close", interrupted_once)
    model = mlp()
    mon = streamspec.watch(model, ["a", "b"], rank=3, store=tmp_path / "r.zarr", live=False)
    train(model, mon, steps=250, batch=8)
    with pytest.raises(KeyboardInterrupt):
        mon.close()
    mon.close()
    assert len(calls) == 2
    ds = streamspec.open(tmp_path / "r.zarr").to_xarray()
    assert ds.sizes["step"] == 250 and ds.sizes["epoch"] == 1


@pytest.mark.parametrize("exact_rows", [None, 0], ids=["exact", "sketched"])
def test_separately_labelled_batches_keep_each_groups_rank_bound(exact_rows) -> None:
    """Group b has one sample (in the first batch only): its activation has rank 1, so σ₂… are
    NaN, as with one forward of both batches. (Rows per group were counted as all counts times
    all calls' rows: noise came out as σ₂.)"""
    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(5, 10, generator=gen), torch.randn(4, 10, generator=gen)
    g1, g2 = torch.tensor([0, 0, 0, 0, 1]), torch.tensor([0, 0, 0, 0])
    sep, tog = _separate_or_together(mlp, x1, g1, x2, g2, rank=4, exact_rows=exact_rows)
    assert sep["count"].values.tolist() == tog["count"].values.tolist() == [[8, 1]]
    b = sep["sigma"].values[0, 0, :, 1]  # [kind, rank] of layer 0, group b
    assert np.isfinite(b[:, 0]).all() and np.isnan(b[:, 1:]).all()
    np.testing.assert_allclose(sep["sigma"].values, tog["sigma"].values, rtol=1e-4, atol=1e-6)


def test_separately_labelled_batches_tie_at_the_same_positions() -> None:
    """``sigma_tied`` of a convolution over two labelled batches: each batch's samples at the
    same positions, as one forward of both (the second batch's rows were given new positions)."""
    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(6, 3, 20, generator=gen), torch.randn(6, 3, 20, generator=gen)
    g1, g2 = torch.tensor([0, 1] * 3), torch.tensor([1, 0, 0, 1, 1, 0])

    def conv() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 3))

    sep, tog = _separate_or_together(conv, x1, g1, x2, g2, rank=3, tied=True)
    assert np.isfinite(sep["sigma_tied"].values[..., 0]).all()
    np.testing.assert_allclose(sep["sigma_tied"], tog["sigma_tied"], rtol=1e-4, atol=1e-6)


def test_an_unlabelled_batch_does_not_leave_out_the_layers_it_skips() -> None:
    """A labelled batch through body and head, an unlabelled one (labels −1) through body and a
    decoder: the head saw every sample the step counts, so it is recorded; the decoder saw none
    of them."""
    torch.manual_seed(0)
    body, head, dec = nn.Linear(6, 6), nn.Linear(6, 2), nn.Linear(6, 6)
    model = nn.ModuleDict({"body": body, "head": head, "dec": dec})
    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        mon.label(torch.tensor([0, 1, 0, 1]))
        supervised = head(body(torch.randn(4, 6))).sum()
        mon.label(torch.full((5,), -1))
        xu = torch.randn(5, 6)
        (supervised + (dec(body(xu)) - xu).pow(2).sum()).backward()
        ds = mon.to_xarray()
    assert ds["count"].values.tolist() == [[2, 2]]
    for name in ("body.weight", "head.weight"):
        assert np.isfinite(ds["sigma"].sel(layer=name).values[..., 0]).all(), name
    assert np.isnan(ds["sigma"].sel(layer="dec.weight").values).all()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointing_with_separately_labelled_batches(reentrant: bool) -> None:
    """Non-reentrant checkpointing captures the first forward: the records equal one forward
    of both batches. A reentrant recomputation cannot tell which batch it belongs to (the labels
    in force are the last batch's): its layers are left unrecorded, with a warning, never
    credited to the wrong group."""
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen)
    g1, g2 = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    model = mlp()
    # (an input requiring a gradient: reentrant checkpointing gives the weights none otherwise)
    run = lambda x: checkpoint(model, x.requires_grad_(), use_reentrant=reentrant)  # noqa: E731
    context = (
        pytest.warns(streamspec.StreamspecWarning, match="use_reentrant=False")
        if reentrant
        else contextlib.nullcontext()
    )
    with context, streamspec.watch(model, ["a", "b"], rank=3, live=False) as mon:
        mon.label(g1)
        y1 = run(x1)
        mon.label(g2)
        (y1.pow(2).sum() + run(x2).pow(2).sum()).backward()
        ds = mon.to_xarray()
    _, together = _separate_or_together(mlp, x1.detach(), g1, x2.detach(), g2, rank=3)
    if reentrant:  # the step is not recorded, or only as NaN: nothing credited to a group
        assert ds.sizes["step"] == 0 or np.isnan(ds["sigma"].values).all()
    else:
        np.testing.assert_allclose(ds["sigma"], together["sigma"], rtol=1e-4, atol=1e-6)


def _host_blas_threads() -> list[int]:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    info = threadpoolctl.threadpool_info()
    return [d["num_threads"] for d in info if d["prefix"] == "libscipy_openblas"]


def test_monitors_closed_in_any_order_restore_numpys_blas_threads() -> None:
    """numpy/scipy's OpenBLAS pools are limited to one thread while monitors run and restored
    when the last one closes, in whichever order they close. (Closing the first-opened monitor
    first left them at one thread for good: the second had saved the first's limit.)"""
    before = _host_blas_threads()
    if not before or max(before) < 2:
        pytest.skip("no multi-threaded numpy OpenBLAS pool to limit here")
    a = streamspec.watch(mlp(0), ["a", "b"], rank=2, live=False)
    b = streamspec.watch(mlp(1), ["a", "b"], rank=2, live=False)
    assert max(_host_blas_threads()) == 1
    a.close()
    assert max(_host_blas_threads()) == 1  # b still runs
    b.close()
    assert _host_blas_threads() == before


def test_a_monitor_collected_without_close_writes_its_steps_and_stops(tmp_path) -> None:
    """A monitor dropped with its model, never closed: once collected, its host thread writes
    the recorded steps, closes the archive and exits (it ran forever, and the steps were never
    written); the next monitor restores numpy's BLAS threads when it closes."""
    import gc
    import threading
    import time

    before = _host_blas_threads()

    def train_and_forget() -> None:
        model = mlp()
        mon = streamspec.watch(model, ["a", "b"], rank=2, store=tmp_path / "r.zarr", live=False)
        train(model, mon, steps=20, batch=8)

    def new_hosts() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "streamspec-host" and t not in old]

    old = {t for t in threading.enumerate() if t.name == "streamspec-host"}
    train_and_forget()
    gc.collect()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and new_hosts():
        time.sleep(0.05)
    assert not new_hosts()
    assert streamspec.open(tmp_path / "r.zarr").to_xarray().sizes["step"] == 20
    with streamspec.watch(mlp(), ["a", "b"], rank=2, live=False):
        pass
    assert _host_blas_threads() == before


def test_resuming_right_after_a_monitor_was_collected_without_close(tmp_path) -> None:
    """A collected monitor's archive is closed by its host thread, shortly after: a new run
    resuming it at once waits for that (it was refused: "another writer holding it")."""
    import gc

    def train_and_forget() -> None:
        model = mlp()
        mon = streamspec.watch(model, ["a", "b"], rank=2, store=tmp_path / "r.zarr", live=False)
        train(model, mon, steps=30, batch=8)

    train_and_forget()
    gc.collect()
    model = mlp()
    with streamspec.watch(
        model, ["a", "b"], rank=2, store=tmp_path / "r.zarr", live=False, resume=True
    ) as mon:
        assert mon.step == 30
        train(model, mon, steps=2, batch=8)
    assert streamspec.open(tmp_path / "r.zarr").to_xarray().sizes["step"] == 32


def test_a_monitor_made_on_another_thread_restores_numpys_blas_threads() -> None:
    """The BLAS limit taken on a worker thread (a monitor created there) is restored when the
    monitor closes on the main thread (OpenBLAS takes thread counts from any thread until the
    main one sets one)."""
    import threading

    before = _host_blas_threads()
    if not before or max(before) < 2:
        pytest.skip("no multi-threaded numpy OpenBLAS pool to limit here")
    made = []
    worker = threading.Thread(
        target=lambda: made.append(streamspec.watch(mlp(), ["a", "b"], rank=2, live=False))
    )
    worker.start()
    worker.join()
    # (Whether the worker's limit takes effect depends on whether the main thread of this
    # process has set a thread count before: OpenBLAS then ignores other threads' counts.)
    made[0].close()
    assert _host_blas_threads() == before


@pytest.mark.parametrize("exact_rows", [0, None], ids=["sketched", "exact"])
def test_a_module_in_two_reentrant_checkpointed_segments_records_both(exact_rows) -> None:
    """Reentrant checkpointing recomputes each segment inside the backward, one at a time, and
    each recomputation's gradient is folded before the next: the second fold overwrote the
    first (the step held one segment's rows). The folds add up to the plain run's step."""
    from torch.utils.checkpoint import checkpoint

    def run(checkpointed: bool) -> xr.Dataset:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

        def f(x: torch.Tensor) -> torch.Tensor:
            return checkpoint(model, x, use_reentrant=True) if checkpointed else model(x)

        gen = torch.Generator().manual_seed(1)
        with streamspec.watch(model, ["a", "b"], rank=2, live=False, exact_rows=exact_rows) as mon:
            for _ in range(2):
                x1 = torch.randn(8, 6, generator=gen, requires_grad=True)
                x2 = (3 * torch.randn(8, 6, generator=gen)).requires_grad_()
                mon.label(torch.arange(8) % 2)
                (f(x1).sum() + f(x2).pow(2).sum()).backward()
        return mon.to_xarray()

    plain, checkpointed = run(False), run(True)
    assert np.isfinite(plain.sigma.values[..., 0]).all()
    for name in ("sigma", "sigma_err"):  # (sigma_err reads the summed norms too)
        np.testing.assert_allclose(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def _tied_in_two_reentrant_segments(
    model: nn.Module, shape: tuple[int, ...], **options: object
) -> xr.Dataset:
    """One step of ``model`` (``tied=True``) over two reentrant-checkpointed segments of six
    samples each; expects the warning that the tying spectrum cannot be combined."""
    from torch.utils.checkpoint import checkpoint

    with (
        pytest.warns(streamspec.StreamspecWarning, match="tying spectrum"),
        streamspec.watch(model, ["a", "b"], rank=2, live=False, tied=True, **options) as mon,
    ):
        x1 = torch.randn(6, *shape, requires_grad=True)
        x2 = torch.randn(6, *shape, requires_grad=True)
        mon.label(torch.arange(6) % 2)
        run = lambda x: checkpoint(model, x, use_reentrant=True)  # noqa: E731
        (run(x1).sum() + run(x2).pow(2).sum()).backward()
    return mon.to_xarray()


def test_a_tied_layer_in_two_reentrant_checkpointed_segments_is_left_unrecorded() -> None:
    """The tying spectrum's Gram is over positions: two folds of it do not add. The layer's step
    is NaN with a warning, never half of it."""
    torch.manual_seed(0)
    conv, head = nn.Conv1d(2, 4, 3), nn.Linear(4, 2)
    model = nn.Sequential(conv, nn.Tanh(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), head)
    ds = _tied_in_two_reentrant_segments(model, (2, 12), exact_rows=0)
    assert np.isnan(ds["sigma"].sel(layer="0.weight").values).all()
    assert np.isfinite(ds["sigma"].sel(layer="4.weight").values[..., 0]).all()


def test_every_weight_of_a_tied_recurrent_module_in_two_segments_is_left_unrecorded() -> None:
    """An LSTM's weights are sites of one module: when the first cannot merge its tying Gram,
    the module is left out, and its other weights were still recorded from one segment's rows
    (weight_hh σ₁ 0.70 against 0.92) with no warning naming them. All are NaN now."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(3, 5, batch_first=True), nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    ds = _tied_in_two_reentrant_segments(Net(), (4, 3))
    for name in ("rnn.weight_ih_l0", "rnn.weight_hh_l0"):
        assert np.isnan(ds["sigma"].sel(layer=name).values).all(), name
        assert np.isnan(ds["sigma_tied"].sel(layer=name).values).all(), name
    assert np.isfinite(ds["sigma"].sel(layer="head.weight").values[..., 0]).all()


def test_gpu_options_default_to_four_layers_on_a_side_stream_on_cuda_only(monkeypatch) -> None:
    """The documented defaults (README, CHANGELOG): CUDA batches 4 layers on a side stream,
    other devices run each layer in its own hook; the variables override both, and a value
    that is no number or switch (1/true/yes/on, 0/false/no/off) falls back to the default."""
    from streamspec.monitor import batch_layers, side_stream

    for var in ("STREAMSPEC_BATCH_LAYERS", "STREAMSPEC_SIDE_STREAM"):
        monkeypatch.delenv(var, raising=False)
    assert (batch_layers("cuda"), side_stream("cuda")) == (4, True)
    assert (batch_layers("cpu"), side_stream("cpu")) == (1, False)
    assert (batch_layers("mps"), side_stream("mps")) == (1, False)
    monkeypatch.setenv("STREAMSPEC_BATCH_LAYERS", "1")
    monkeypatch.setenv("STREAMSPEC_SIDE_STREAM", "0")
    assert (batch_layers("cuda"), side_stream("cuda")) == (1, False)
    monkeypatch.setenv("STREAMSPEC_BATCH_LAYERS", "8")
    monkeypatch.setenv("STREAMSPEC_SIDE_STREAM", "1")
    assert (batch_layers("cpu"), side_stream("cpu")) == (8, True)
    monkeypatch.setenv("STREAMSPEC_SIDE_STREAM", "off")
    assert side_stream("cuda") is False
    monkeypatch.setenv("STREAMSPEC_BATCH_LAYERS", "many")
    monkeypatch.setenv("STREAMSPEC_SIDE_STREAM", "maybe")
    assert (batch_layers("cuda"), side_stream("cuda")) == (4, True)


def test_end_epoch_on_another_thread_during_a_backward_keeps_the_step_in_flight() -> None:
    """end_epoch() from another thread (a scheduler, a UI) while the training thread's backward
    runs: that thread's graph task id is always -1, so the live step was taken for a failed
    backward and discarded mid-backward (a step lost). Only the owner thread drops a dead step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    in_backward, go_on = threading.Event(), threading.Event()

    def slow(grad: torch.Tensor) -> torch.Tensor:  # between the last and the first layer's hooks
        in_backward.set()
        assert go_on.wait(10)
        return grad

    def other_thread() -> None:
        assert in_backward.wait(10)
        mon.end_epoch()
        go_on.set()

    with streamspec.watch(model, ["a", "b"], rank=2, live=False) as mon:
        for step in range(3):
            mon.label(torch.tensor([0, 1, 0, 1]))
            h = model[0](torch.randn(4, 8))
            if step == 1:
                h.register_hook(slow)
                thread = threading.Thread(target=other_thread, daemon=True)
                thread.start()
            model[4](model[3](model[2](model[1](h)))).pow(2).sum().backward()
            if step == 1:
                thread.join(10)
                assert not thread.is_alive()
        ds = mon.to_xarray()
    assert ds.sizes["step"] == 3 and ds.sizes["epoch"] == 1  # (the last epoch: at close)
    assert np.isfinite(ds["sigma"].values[..., 0]).all()
