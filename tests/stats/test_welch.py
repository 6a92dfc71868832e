"""Streaming Welch tests against scipy's brute force, and the invariants of streaming."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

from streamspec.errors import StreamspecError
from streamspec.layout import pair_indices
from streamspec.stats import GroupWelch, Welford, welch_t_test

SHAPE = (3, 3, 3, 4)  # [layer, kind, group, rank]


def steps_with_nans(seed: int, n_steps: int = 40, shape=SHAPE, nan_rate=0.2) -> np.ndarray:
    """Per-step sigma, float32 like the archive: groups differ in mean and scale; NaN holes,
    one group entirely absent in one cell and seen once in another."""
    rng = np.random.default_rng(seed)
    loc = rng.uniform(1.0, 3.0, size=shape)
    scale = rng.uniform(0.1, 1.0, size=shape)
    x = loc + scale * rng.standard_normal((n_steps, *shape))
    x[rng.random(x.shape) < nan_rate] = np.nan
    x[:, 0, 0, 0, 0] = np.nan  # group 0 never seen in this cell
    x[1:, 1, 2, 1, 3] = np.nan  # group 1 seen at most once in this cell
    return x.astype(np.float32)


def scipy_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ttest_ind(equal_var=False, nan_policy="omit")`` per pair on the float64 values."""
    x = x.astype(np.float64)
    ts, ps = [], []
    with warnings.catch_warnings():
        # scipy warns for too-small samples and for constant data; we compare its outputs.
        warnings.simplefilter("ignore")
        for a, b in pair_indices(x.shape[3]):
            res = stats.ttest_ind(
                x[:, :, :, a], x[:, :, :, b], axis=0, equal_var=False, nan_policy="omit"
            )
            ts.append(np.asarray(res.statistic))
            ps.append(np.asarray(res.pvalue))
    return np.stack(ts, axis=2), np.stack(ps, axis=2)


def assert_matches(got: np.ndarray, ref: np.ndarray) -> None:
    """Equal NaN/inf pattern; finite values within 1e-6·max(1, |ref|)."""
    assert got.shape == ref.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])
    finite = np.isfinite(ref)
    err = np.abs(got[finite] - ref[finite])
    assert np.all(err <= 1e-6 * np.maximum(1.0, np.abs(ref[finite]))), err.max()


def compute_steps(x: np.ndarray) -> GroupWelch:
    gw = GroupWelch(x.shape[1:])
    for step in x:
        gw.update(step)
    return gw


# --- against scipy -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_welch_matches_scipy_with_nans(seed):
    x = steps_with_nans(seed)
    t, p = compute_steps(x).compute()
    t_ref, p_ref = scipy_reference(x)
    assert t.shape == p.shape == (3, 3, 3, 4)  # 3 groups -> 3 pairs
    assert_matches(t, t_ref)
    assert_matches(p, p_ref)
    assert np.isnan(t[0, 0, :2, 0]).all()  # pairs (0, 1), (0, 2) with the empty group
    assert np.isfinite(t).sum() > 0.9 * t.size


def test_sign_follows_pair_order():
    x = np.zeros((10, 1, 1, 2, 1), dtype=np.float32)
    x[:, 0, 0, 0, 0] = np.linspace(5, 6, 10)
    x[:, 0, 0, 1, 0] = np.linspace(1, 2, 10)
    t, _ = compute_steps(x).compute()
    assert t[0, 0, 0, 0] > 0  # pair (0, 1): mean(group 0) − mean(group 1) > 0


EDGE_CASES = {
    # name: (group a, group b); NaN pads to a common number of steps.
    "a all NaN": ([np.nan] * 4, [1.0, 2.0, 3.0, 4.0]),
    "a seen once": ([2.0, np.nan, np.nan, np.nan], [1.0, 2.0, 3.0, 4.0]),
    "both seen once": ([2.0, np.nan, np.nan], [1.0, np.nan, np.nan]),
    "both constant, different": ([1.5, 1.5, 1.5], [2.5, 2.5, 2.5]),
    "both constant, b larger first": ([2.5, 2.5, 2.5], [1.5, 1.5, 1.5]),
    "both constant, equal": ([0.1, 0.1, 0.1], [0.1, 0.1, np.nan]),
    "a constant": ([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]),
    "identical": ([0.3, 1.7, 2.9, 0.1], [0.3, 1.7, 2.9, 0.1]),
    "two each": ([1.0, 2.0, np.nan], [3.0, 5.0, np.nan]),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_match_scipy(name):
    a, b = EDGE_CASES[name]
    steps = max(len(a), len(b))
    x = np.full((steps, 1, 1, 2, 1), np.nan, dtype=np.float32)
    x[: len(a), 0, 0, 0, 0] = a
    x[: len(b), 0, 0, 1, 0] = b
    t, p = compute_steps(x).compute()
    t_ref, p_ref = scipy_reference(x)
    assert_matches(t, t_ref)
    assert_matches(p, p_ref)


def test_edge_case_values_are_the_documented_ones():
    cases = list(EDGE_CASES.values())
    x = np.full((4, 1, 1, 2, len(cases)), np.nan, dtype=np.float32)
    for r, (a, b) in enumerate(cases):
        x[: len(a), 0, 0, 0, r] = a
        x[: len(b), 0, 0, 1, r] = b
    t, p = compute_steps(x).compute()
    got = dict(zip(EDGE_CASES, zip(t[0, 0, 0], p[0, 0, 0], strict=True), strict=True))
    assert np.isnan(got["a all NaN"]).all()
    assert np.isnan(got["a seen once"]).all()
    assert got["both constant, different"] == (-np.inf, 0.0)
    assert got["both constant, b larger first"] == (np.inf, 0.0)
    assert np.isnan(got["both constant, equal"]).all()
    assert got["identical"] == (0.0, 1.0)


def test_welch_t_test_matches_ttest_ind_from_stats():
    rng = np.random.default_rng(3)
    shape = (500,)
    m1, m2 = rng.normal(size=shape), rng.normal(size=shape)
    v1, v2 = rng.uniform(0.01, 4, size=shape), rng.uniform(0.01, 4, size=shape)
    n1, n2 = rng.integers(2, 60, size=shape), rng.integers(2, 60, size=shape)
    t, p = welch_t_test(m1, v1, n1, m2, v2, n2)
    ref = stats.ttest_ind_from_stats(m1, np.sqrt(v1), n1, m2, np.sqrt(v2), n2, equal_var=False)
    np.testing.assert_allclose(t, ref.statistic, rtol=1e-12)
    np.testing.assert_allclose(p, ref.pvalue, rtol=1e-10, atol=1e-300)


def test_welch_t_test_broadcasts():
    t, p = welch_t_test(np.zeros((2, 1)), 1.0, 10, np.ones((1, 3)), 1.0, 10)
    assert t.shape == p.shape == (2, 3)


# --- invariants of streaming ---------------------------------------------------------------------


def assert_same_state(a: Welford, b: Welford) -> None:
    np.testing.assert_array_equal(a.n, b.n)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.m2, b.m2, rtol=1e-10, atol=1e-12)


def test_welford_matches_numpy():
    x = steps_with_nans(4).astype(np.float64)
    w = Welford(SHAPE).update_batch(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty and single-value cells
        n = (~np.isnan(x)).sum(axis=0)
        np.testing.assert_allclose(w.nanmean, np.nanmean(x, axis=0), rtol=1e-12)
        ref_var = np.where(n >= 2, np.nanvar(x, axis=0, ddof=1), np.nan)
    np.testing.assert_array_equal(w.n, n)
    np.testing.assert_allclose(w.var, ref_var, rtol=1e-10)


def test_update_batch_equals_per_row_updates():
    x = steps_with_nans(5)
    rows = Welford(SHAPE)
    for row in x:
        rows.update(row)
    assert_same_state(Welford(SHAPE).update_batch(x), rows)


@pytest.mark.parametrize("chunks", [[40], [1] * 40, [7, 0, 13, 1, 19], [39, 1]])
def test_chunked_equals_one_shot(chunks):
    x = steps_with_nans(6)
    one_shot = compute_steps(x)
    chunked, start = GroupWelch(SHAPE), 0
    for size in chunks:
        chunked.update_batch(x[start : start + size])
        start += size
    assert_same_state(chunked.welford, one_shot.welford)
    for got, ref in zip(chunked.compute(), one_shot.compute(), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_merged_strided_shards_equal_one_pass(world):
    x = steps_with_nans(7, n_steps=41)
    shards = [compute_steps(x[r::world]) for r in range(world)]  # range(r, n, world)
    merged = shards[0]
    for shard in shards[1:]:
        merged.merge(shard)
    one_pass = compute_steps(x)
    assert_same_state(merged.welford, one_pass.welford)
    for got, ref in zip(merged.compute(), one_pass.compute(), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_merge_with_empty_state_is_exact():
    x = steps_with_nans(8)
    full = Welford(SHAPE).update_batch(x)
    empty_first = Welford(SHAPE).merge(full)
    np.testing.assert_array_equal(empty_first.mean, full.mean)
    np.testing.assert_array_equal(empty_first.m2, full.m2)
    before = full.state_dict()
    full.merge(Welford(SHAPE))
    for key, value in before.items():
        np.testing.assert_array_equal(full.state_dict()[key], value)


def test_state_dict_resume_equals_uninterrupted():
    x = steps_with_nans(9)
    first = compute_steps(x[:15])
    resumed = GroupWelch.from_state_dict(first.state_dict())
    for step in x[15:]:
        resumed.update(step)
    ref = compute_steps(x)
    assert_same_state(resumed.welford, ref.welford)
    state = resumed.state_dict()
    assert {k: v.dtype for k, v in state.items()} == {
        "n": np.int64,
        "mean": np.float64,
        "m2": np.float64,
    }


def test_reset_forgets_steps():
    gw = compute_steps(steps_with_nans(10))
    gw.reset()
    assert gw.n_steps == 0
    assert np.isnan(gw.compute()[0]).all()


def test_float32_cancellation_does_not_lose_variance():
    # Large offset, unit spread: a float32 one-pass sum of squares returns ~0 here.
    rng = np.random.default_rng(11)
    x = (1e4 + rng.standard_normal((5000, 1))).astype(np.float32)
    w = Welford((1,))
    for row in x:
        w.update(row)
    ref = np.var(x.astype(np.float64), ddof=1)
    np.testing.assert_allclose(w.var[0], ref, rtol=1e-9)
    np.testing.assert_allclose(Welford((1,)).update_batch(x).var[0], ref, rtol=1e-9)


def test_single_group_has_no_pairs():
    gw = GroupWelch((2, 3, 1, 4)).update(np.ones((2, 3, 1, 4), np.float32))
    t, p = gw.compute()
    assert t.shape == p.shape == (2, 3, 0, 4)


# --- power and calibration -----------------------------------------------------------------------


def test_planted_difference_gives_tiny_p():
    rng = np.random.default_rng(12)
    x = rng.normal(1.0, 0.1, size=(50, 2, 3, 2, 4)).astype(np.float32)
    x[:, 1, 2, 0, 0] += 0.2  # layer 1, gradient, group 0, sigma_1
    t, p = compute_steps(x).compute()
    assert p[1, 2, 0, 0] < 1e-6 and t[1, 2, 0, 0] > 5
    others = np.ones(p.shape, bool)
    others[1, 2, 0, 0] = False
    assert np.median(p[others]) > 0.1


def test_false_positive_rate_under_the_null_is_five_percent():
    # 4000 independent cells, unequal n (NaN holes) and unequal variances (Welch's case).
    rng = np.random.default_rng(13)
    cells, steps = 4000, 25
    x = np.empty((steps, 1, 1, 2, cells), np.float32)
    x[:, 0, 0, 0] = rng.normal(2.0, 1.0, size=(steps, cells))
    x[:, 0, 0, 1] = rng.normal(2.0, 3.0, size=(steps, cells))
    x[rng.random(x.shape) < 0.3] = np.nan
    _, p = compute_steps(x).compute()
    rate = np.mean(p < 0.05)
    tolerance = 4 * np.sqrt(0.05 * 0.95 / cells)  # 4 binomial standard deviations
    assert abs(rate - 0.05) < tolerance, rate


# --- errors ---------------------------------------------------------------------------------------


def test_shape_errors_teach():
    gw = GroupWelch(SHAPE)
    with pytest.raises(StreamspecError, match=r"expected sigma of shape \(3, 3, 3, 4\)"):
        gw.update(np.zeros((3, 3, 2, 4), np.float32))
    with pytest.raises(StreamspecError, match="batch"):
        Welford((2,)).update_batch(np.zeros(2))
    with pytest.raises(StreamspecError, match="Welford state"):
        Welford((2,)).merge(Welford((3,)))
    with pytest.raises(StreamspecError, match="keys"):
        Welford.from_state_dict({"n": np.zeros(2)})
    with pytest.raises(StreamspecError, match="layer, kind, group, rank"):
        GroupWelch((3, 3, 4))  # type: ignore[arg-type]
