"""Opening runs, picking layers and groups, pooled contrasts and windows."""

from __future__ import annotations

import numpy as np
import pytest

from streamspec.analysis import (
    Contrast,
    contrast_sigma,
    epoch_windows,
    load,
    one_vs_rest,
    pairs,
    pool,
    pooled_pairs,
    pooled_sigma,
    resolve_contrasts,
    run_window,
    select,
    sliding_windows,
)
from streamspec.errors import StreamspecError
from tests.analysis._archives import GROUPS, write_synthetic


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return load(write_synthetic(tmp_path_factory.mktemp("data") / "run.zarr"))


def test_load_refuses_a_non_archive(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(StreamspecError, match="expected a streamspec archive"):
        load(tmp_path)


def test_load_refuses_a_damaged_archive(tmp_path) -> None:
    path = write_synthetic(tmp_path / "run.zarr")
    chunk = next(p for p in (path / "sigma").rglob("*") if p.is_file() and "c" in p.parts)
    chunk.write_bytes(b"not zstd")
    with pytest.raises(StreamspecError, match="(?i)damaged|does not decode|readable"):
        load(path)


def test_pooled_sigma_is_the_count_weighted_mean(ds) -> None:
    members = ("HC/F", "HC/M")
    got, n = pooled_sigma(ds, members)
    sigma = ds["sigma"].sel(group=list(members)).values.astype(np.float64)
    count = ds["count"].sel(group=list(members)).values
    for s in range(ds.sizes["step"]):  # the slow way, one cell at a time
        for cell in np.ndindex(got.shape[1:]):
            num = den = 0.0
            for g in range(len(members)):
                v = sigma[(s, *cell[:2], g, cell[2])]
                if count[s, g] > 0 and np.isfinite(v):
                    num += count[s, g] * v
                    den += count[s, g]
            want = num / den if den > 0 else np.nan
            np.testing.assert_allclose(got[(s, *cell)], want, rtol=1e-12)
    np.testing.assert_array_equal(n, count.sum(axis=1))
    # HC/M has no sample at step 5: the pool is HC/F there, exactly
    np.testing.assert_array_equal(got[5], sigma[5, :, :, 0])


def test_a_single_member_pool_is_the_group_itself(ds) -> None:
    got, n = pooled_sigma(ds, ["SZ/M"])
    np.testing.assert_array_equal(got, ds["sigma"].sel(group="SZ/M").values.astype(np.float64))
    np.testing.assert_array_equal(n, ds["count"].sel(group="SZ/M").values)


def test_pools_by_separator_and_by_mapping() -> None:
    assert pool(GROUPS) == {"SZ": ("SZ/F", "SZ/M"), "HC": ("HC/F", "HC/M")}
    assert pool(GROUPS, level=1) == {"F": ("SZ/F", "HC/F"), "M": ("SZ/M", "HC/M")}
    by = {"SZ/F": "female", "HC/F": "female", "SZ/M": "male"}
    assert pool(GROUPS, by=by) == {"female": ("SZ/F", "HC/F"), "male": ("SZ/M",)}
    (c,) = pooled_pairs(GROUPS)
    assert c == Contrast(("SZ/F", "SZ/M"), ("HC/F", "HC/M"), "SZ", "HC")
    assert c.name == "SZ vs HC"
    with pytest.raises(StreamspecError, match="unknown groups"):
        pool(GROUPS, by={"XX": "a"})
    with pytest.raises(StreamspecError, match="part 2"):
        pool(GROUPS, level=2)


def test_contrast_specs() -> None:
    assert [c.name for c in pairs("abc")] == ["a vs b", "a vs c", "b vs c"]
    assert [c.name for c in one_vs_rest("abc")] == ["a vs rest", "b vs rest", "c vs rest"]
    assert one_vs_rest("abc")[1].b == ("a", "c")
    (c,) = resolve_contrasts(GROUPS, ["SZ/F+SZ/M vs HC/F"])
    assert (c.a, c.b) == (("SZ/F", "SZ/M"), ("HC/F",))
    assert [c.name for c in resolve_contrasts(GROUPS, "pooled")] == ["SZ vs HC"]
    with pytest.raises(StreamspecError, match="unknown group"):
        resolve_contrasts(GROUPS, ["SZ vs HC"])
    with pytest.raises(StreamspecError, match="disjoint"):
        resolve_contrasts(GROUPS, [Contrast.of(["SZ/F"], ["SZ/F", "HC/F"])])
    with pytest.raises(StreamspecError, match="'pairs', 'one-vs-rest'"):
        resolve_contrasts(GROUPS, "everything")


def test_contrast_sigma_dims(ds) -> None:
    sd = contrast_sigma(ds, resolve_contrasts(GROUPS, "one-vs-rest"))
    assert sd["a"].dims == ("step", "layer", "kind", "contrast", "rank")
    assert list(sd["contrast"].values) == [f"{g} vs rest" for g in GROUPS]
    np.testing.assert_array_equal(sd["count_a"].values[:, 0], ds["count"].values[:, 0])


def test_select_by_names_and_patterns(ds) -> None:
    out = select(ds, layers=["*fc2"], groups=["HC/*", "SZ/F"])
    assert list(out["layer"].values) == ["encoder.fc2"]
    assert list(out["group"].values) == ["SZ/F", "HC/F", "HC/M"]  # run order
    assert list(out["pair"].values) == ["SZ/F vs HC/F", "SZ/F vs HC/M", "HC/F vs HC/M"]
    with pytest.raises(StreamspecError, match=r"a layer of the run .*'encoder.fc1'.*got 'fc3'"):
        select(ds, layers=["fc3"])
    with pytest.raises(StreamspecError, match="a group of the run"):
        select(ds, groups=["PT/F"])


def test_windows(ds) -> None:
    e = epoch_windows(ds)
    assert e.dims == ("epoch", "step") and e.shape == (3, 36)
    np.testing.assert_array_equal(e.sum("step").values, [12, 12, 12])
    w = sliding_windows(ds, 10, 5)
    assert w.shape == (6, 36)
    np.testing.assert_array_equal(w["window_start"].values, [0, 5, 10, 15, 20, 25])
    np.testing.assert_array_equal(w["window_stop"].values, [9, 14, 19, 24, 29, 34])
    assert bool(run_window(ds).all())
    with pytest.raises(StreamspecError, match="size"):
        sliding_windows(ds, 100)
