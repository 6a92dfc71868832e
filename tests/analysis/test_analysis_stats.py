"""Offline t-tests and FDR against scipy's brute force."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from streamspec.analysis import (
    across_ranks,
    across_steps,
    contrast_sigma,
    fdr,
    fdr_bh,
    load,
    paired_t_test,
    resolve_contrasts,
    sliding_windows,
)
from streamspec.analysis.data import pooled_sigma
from streamspec.errors import StreamspecError
from tests.analysis._archives import GROUPS, write_synthetic


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return load(write_synthetic(tmp_path_factory.mktemp("stats") / "run.zarr"))


def assert_like_scipy(got: np.ndarray, ref: np.ndarray) -> None:
    """Same NaN pattern; values within 1e-9 relative."""
    ref = np.asarray(ref, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # scipy warns on tiny / constant samples; we compare outputs
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("spec", ["pairs", "one-vs-rest", "pooled"])
def test_welch_across_steps_per_window_equals_scipy(ds, spec) -> None:
    windows = sliding_windows(ds, 10, 4)
    got = across_steps(ds, spec, windows)
    assert got["t"].dims == ("window", "layer", "kind", "contrast", "rank")
    for k, c in enumerate(resolve_contrasts(GROUPS, spec)):
        a, _ = pooled_sigma(ds, c.a)
        b, _ = pooled_sigma(ds, c.b)
        for w, rows in enumerate(windows.values):
            ref = quiet(
                stats.ttest_ind, a[rows], b[rows], axis=0, equal_var=False, nan_policy="omit"
            )
            assert_like_scipy(got["t"].values[w, :, :, k], ref.statistic)
            assert_like_scipy(got["p"].values[w, :, :, k], ref.pvalue)


def test_epoch_welch_reproduces_the_archived_tests(ds) -> None:
    got = across_steps(ds, "pairs", "epoch")
    assert list(got["contrast"].values) == list(ds["pair"].values)
    np.testing.assert_allclose(got["t"].values, ds["welch_t"].values, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got["p"].values, ds["welch_p"].values, rtol=1e-10, atol=1e-300)


def test_paired_across_steps_equals_ttest_rel(ds) -> None:
    a, _ = pooled_sigma(ds, ("SZ/F", "SZ/M"))
    b, _ = pooled_sigma(ds, ("HC/F", "HC/M"))
    b[3, 0, 0, 0] = np.nan  # a missing side omits the pair
    got = across_steps(
        contrast_sigma(ds, resolve_contrasts(GROUPS, "pooled")).assign(
            b=(("step", "layer", "kind", "contrast", "rank"), b[:, :, :, None])
        ),
        windows="epoch",
        method="paired",
    )
    for e in range(3):
        rows = ds["step_epoch"].values == e
        ref = quiet(stats.ttest_rel, a[rows], b[rows], axis=0, nan_policy="omit")
        assert_like_scipy(got["t"].values[e, :, :, 0], ref.statistic)
        assert_like_scipy(got["p"].values[e, :, :, 0], ref.pvalue)
    assert int(got["n_a"].values[0, 0, 0, 0, 0]) == 11


def test_paired_edge_cases_follow_scipy() -> None:
    cases = [
        np.array([1.0, 1.0, 1.0]),
        np.array([0.0, 0.0]),
        np.array([2.5]),
        np.array([-1.0, -1.0]),
    ]
    for d in cases:
        ref = quiet(stats.ttest_1samp, d, 0.0)
        t, p = paired_t_test(d.mean(), d.var(ddof=1) if d.size > 1 else np.nan, d.size)
        assert_like_scipy(np.asarray(t), ref.statistic)
        assert_like_scipy(np.asarray(p), ref.pvalue)


def test_across_ranks_equals_scipy_along_rank(ds) -> None:
    got = across_ranks(ds, "pooled")
    assert got["t"].dims == ("step", "layer", "kind", "contrast")
    a, _ = pooled_sigma(ds, ("SZ/F", "SZ/M"))
    b, _ = pooled_sigma(ds, ("HC/F", "HC/M"))
    ref = quiet(stats.ttest_ind, a, b, axis=-1, equal_var=False, nan_policy="omit")
    assert_like_scipy(got["t"].values[..., 0], ref.statistic)
    assert_like_scipy(got["p"].values[..., 0], ref.pvalue)
    top = across_ranks(ds, "pairs", ranks=slice(0, 2))
    ref2 = quiet(
        stats.ttest_ind,
        ds["sigma"].values[..., 0, :2].astype(float),
        ds["sigma"].values[..., 1, :2].astype(float),
        axis=-1,
        equal_var=False,
    )
    assert_like_scipy(top["t"].values[..., 0], ref2.statistic)


def test_windows_must_match_the_run(ds) -> None:
    with pytest.raises(StreamspecError, match="windows 'epoch', 'run'"):
        across_steps(ds, windows="daily")
    with pytest.raises(StreamspecError, match="method 'welch' or 'paired'"):
        across_steps(ds, method="ranked")  # type: ignore[arg-type]
    other = xr.DataArray(np.ones((1, 5), bool), dims=("window", "step"))
    with pytest.raises(StreamspecError, match="boolean mask"):
        across_steps(ds, windows=other)


def test_fdr_bh_equals_scipy_with_nan_masked() -> None:
    rng = np.random.default_rng(0)
    p = rng.random((3, 4, 50)) ** 3
    p[0, 1, :7] = np.nan
    q = fdr_bh(p)
    ok = np.isfinite(p)
    np.testing.assert_allclose(q[ok], stats.false_discovery_control(p[ok]), rtol=1e-14)
    assert np.isnan(q[~ok]).all()
    per = fdr_bh(p, axis=(1, 2))  # one family per index of axis 0
    for i in range(3):
        fam = p[i][np.isfinite(p[i])]
        np.testing.assert_allclose(per[i][np.isfinite(p[i])], stats.false_discovery_control(fam))
    assert np.isnan(fdr_bh(np.full(4, np.nan))).all()


def test_fdr_families_are_time_layer_rank(ds) -> None:
    res = across_steps(ds, "pairs", "epoch")
    q = fdr(res["p"])
    assert q.attrs["fdr_family"] == "epoch,layer,rank"
    k, c = 1, 2
    p = res["p"].values[:, :, k, c, :]
    ref = stats.false_discovery_control(p[np.isfinite(p)])
    np.testing.assert_allclose(q.values[:, :, k, c, :][np.isfinite(p)], ref)
    with pytest.raises(StreamspecError, match="family dimensions"):
        fdr(res["p"], over=["group"])
