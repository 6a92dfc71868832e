"""Cluster permutation test: numba and numpy routes against a slow pure-Python reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from streamspec.analysis import cluster_permutation_test, cluster_test, load
from streamspec.analysis import clusters as cl
from streamspec.errors import StreamspecError
from tests.analysis import _reference as ref
from tests.analysis._archives import write_synthetic

BACKENDS = [
    "numpy",
    pytest.param(
        "numba",
        marks=pytest.mark.skipif(
            not cl.numba_available(), reason="numba not installed (pip install streamspec[fast])"
        ),
    ),
]


def small_data(seed: int = 0, cells: int = 4, steps: int = 30) -> np.ndarray:
    """Paired differences [cells, steps]: noise, a planted run in cell 1, NaN holes."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((cells, steps))
    d[1, 10:20] += 2.5
    d[2, 5] = np.nan
    d[3, 12:15] = np.nan
    return d


@pytest.mark.parametrize("statistic", ["t", "z"])
@pytest.mark.parametrize("window", [1, 3, 5])
def test_moving_statistic_equals_the_reference(window, statistic) -> None:
    d = small_data()
    got = cl.moving_statistic(d, window, statistic)
    for c in range(d.shape[0]):
        np.testing.assert_allclose(got[c], ref.moving(d[c], window, statistic), rtol=1e-10)
    if statistic == "t" and window > 1:  # and the reference is scipy's one-sample t
        h = window // 2
        for c, s in np.ndindex(d.shape):
            x = d[c, max(0, s - h) : s + h + 1]
            x = x[np.isfinite(x)]
            if x.size >= 2:  # scipy warns below two values (we give NaN)
                want = stats.ttest_1samp(x, 0.0).statistic
                assert got[c, s] == pytest.approx(want, rel=1e-10)
            else:
                assert np.isnan(got[c, s])


def test_z_is_a_monotone_function_of_t() -> None:
    d = small_data()[:1, :12]
    t, z = cl.moving_statistic(d, 5, "t"), cl.moving_statistic(d, 5, "z")
    n = np.array([3, 4] + [5] * 8 + [4, 3])
    np.testing.assert_allclose(t, z * np.sqrt((n - 1) / (n - z * z)), rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("window", "block", "statistic"), [(1, 1, "t"), (5, 1, "t"), (3, 4, "t"), (5, 2, "z")]
)
def test_null_maxima_equal_the_slow_reference(backend, window, block, statistic) -> None:
    d = small_data()
    flips = cl.sign_flips(d.shape[1], 25, block=block, seed=3)
    threshold = 1.2 if window == 1 or statistic == "z" else 2.0
    run = cl._null_max_numba if backend == "numba" else cl._null_max_numpy
    got = run(d, flips, window, threshold, statistic)
    want = ref.null_max(d, flips, window, threshold, statistic)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_sign_flips_are_seeded_and_blocked() -> None:
    a = cl.sign_flips(10, 6, block=3, seed=1)
    np.testing.assert_array_equal(a, cl.sign_flips(10, 6, block=3, seed=1))
    assert set(np.unique(a)) == {-1.0, 1.0}
    np.testing.assert_array_equal(a[:, 0], a[:, 2])  # one sign per block
    np.testing.assert_array_equal(a[:, 9], a[:, 9])
    assert not np.array_equal(a, cl.sign_flips(10, 6, block=3, seed=2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("statistic", ["t", "z"])
def test_cluster_pvalues_equal_the_slow_reference(backend, statistic) -> None:
    d = small_data()
    res = cluster_permutation_test(
        d.T, window=5, statistic=statistic, n_permutations=40, seed=7, backend=backend
    )
    flips = cl.sign_flips(d.shape[1], 40, seed=7)
    threshold = stats.t.ppf(0.975, 4) if statistic == "t" else 1.96
    assert res.threshold == pytest.approx(threshold)
    want = ref.cluster_pvalues(d, flips, 5, threshold, statistic)
    got = [
        (int(c[0]), int(s), int(e), int(g), m, p)
        for c, s, e, g, m, p in zip(
            res.cell, res.start, res.stop, res.sign, res.mass, res.p, strict=True
        )
    ]
    assert sorted(x[:4] for x in got) == sorted(x[:4] for x in want)
    for g, w in zip(sorted(got), sorted(want), strict=True):
        assert g[4] == pytest.approx(w[4], rel=1e-10)
        assert g[5] == pytest.approx(w[5], rel=1e-12)
    # per-step maps agree with the cluster table
    for k in range(len(res.p)):
        c = res.cell[k, 0]
        steps = np.flatnonzero(res.cluster_id[:, c] == k)
        np.testing.assert_array_equal(steps, np.arange(res.start[k], res.stop[k]))
        assert np.all(res.cluster_p[steps, c] == res.p[k])


@pytest.mark.parametrize("statistic", ["t", "z"])
def test_backends_agree_and_a_planted_run_is_found(statistic) -> None:
    d = small_data(steps=80)
    d[1, 20:30] += 2.0  # the planted run spans steps 10-29
    kw = {"window": 9, "n_permutations": 200, "seed": 0, "families": [0, 0, 0, 0]}
    kw["statistic"] = statistic
    numpy_res = cluster_permutation_test(d.T, backend="numpy", **kw)
    best = int(np.argmin(numpy_res.p))
    assert numpy_res.cell[best, 0] == 1 and numpy_res.sign[best] == 1
    assert 6 <= numpy_res.start[best] <= 12 and 27 <= numpy_res.stop[best] <= 34
    assert numpy_res.p[best] <= 0.01
    assert numpy_res.null.shape == (200, 1)
    if cl.numba_available():
        numba_res = cluster_permutation_test(d.T, backend="numba", **kw)
        np.testing.assert_allclose(numba_res.null, numpy_res.null, rtol=1e-12)
        np.testing.assert_array_equal(numba_res.p, numpy_res.p)


def test_family_maximum_is_over_its_cells() -> None:
    d = small_data()
    one = cluster_permutation_test(d.T, window=5, n_permutations=30, families=[0, 0, 1, 1])
    cells = cluster_permutation_test(d.T, window=5, n_permutations=30)
    np.testing.assert_allclose(one.null[:, 0], cells.null[:, :2].max(axis=1))
    np.testing.assert_allclose(one.null[:, 1], cells.null[:, 2:].max(axis=1))
    assert np.all(one.p >= cells.p)  # a larger family never gives a smaller p


def test_errors() -> None:
    d = small_data().T
    with pytest.raises(StreamspecError, match="odd window"):
        cluster_permutation_test(d, window=4)
    with pytest.raises(StreamspecError, match="threshold when window=1"):
        cluster_permutation_test(d, window=1)
    with pytest.raises(StreamspecError, match="backend"):
        cluster_permutation_test(d, backend="gpu")  # type: ignore[arg-type]


def test_numba_missing_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(cl, "numba", None)
    with pytest.raises(StreamspecError, match=r"streamspec\[fast\]"):
        cluster_permutation_test(small_data().T, backend="numba")
    res = cluster_permutation_test(small_data().T, n_permutations=5)  # auto: numpy
    assert res.backend == "numpy"


def test_cluster_test_on_an_archive(tmp_path) -> None:
    ds = load(write_synthetic(tmp_path / "run.zarr", steps_per_epoch=20))
    res = cluster_test(ds, "pooled", window=5, n_permutations=200, block=2, seed=1)
    assert res["t"].dims == ("step", "layer", "kind", "contrast", "rank")
    assert res.attrs["family"] == "contrast" and res.attrs["block"] == 2
    # the planted effect: SZ σ₁ of encoder.fc1 activations from step 20 on
    sig = res["cluster_pvalue"] <= 0.05
    hit = res.where(sig, drop=True)
    assert set(hit["cluster_layer"].values) == {"encoder.fc1"}
    assert set(hit["cluster_kind"].values) == {"activation"}
    assert set(hit["cluster_rank"].values.tolist()) == {0}
    assert hit["cluster_start"].min() >= 17 and set(hit["cluster_sign"].values.tolist()) == {1}
    again = cluster_test(ds, "pooled", window=5, n_permutations=200, block=2, seed=1)
    np.testing.assert_array_equal(again["cluster_pvalue"].values, res["cluster_pvalue"].values)
