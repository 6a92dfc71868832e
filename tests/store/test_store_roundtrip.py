"""What is written is what is read: through Archive.to_xarray, xarray.open_zarr and zarr itself."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import xarray as xr
import zarr

from streamspec import __version__
from streamspec.layout import KINDS, RunLayout
from streamspec.store import ArchiveWriter, open_archive
from streamspec.store.schema import ROW_VARIABLES, row_variables

N_STEPS = 23  # with chunk_steps=8, flush_every=5: several flushes, the last one partial
EVERY = 2  # recorded steps are 0, 2, 4, …
STEPS_PER_EPOCH = 12


def write_run(writer, step_row, epoch_row, n_steps=N_STEPS):
    """Write ``n_steps`` steps and one epoch row after each full epoch; return what was written."""
    steps, epochs = [], []
    for i in range(n_steps):
        step, epoch = EVERY * i, i // STEPS_PER_EPOCH
        steps.append((step, epoch, step_row(step)))
        writer.append_step(steps[-1][2], step=step, epoch=epoch)
        if (i + 1) % STEPS_PER_EPOCH == 0 or i == n_steps - 1:
            epochs.append((epoch, epoch_row(epoch)))
            writer.append_epoch(epochs[-1][1], epoch=epoch)
    return steps, epochs


WRITTEN = {"sigma", "count", "sigma_epoch", "welch_t", "welch_p"}


def check_dataset(ds: xr.Dataset, layout: RunLayout, steps, epochs) -> None:
    # Variables a row may leave out (e.g. sigma_err) are there too, all fill values.
    left_out = {
        v.name
        for v in row_variables(layout=layout)
        if not v.required and not v.coordinate and v.name not in WRITTEN
    }
    assert set(ds.data_vars) == WRITTEN | left_out
    for name in left_out:
        assert ds[name].isnull().all() and ds[name].dims[0] == "step"
    assert set(ds.coords) == {
        "step",
        "step_epoch",
        "epoch",
        "layer",
        "kind",
        "group",
        "rank",
        "pair",
    }
    assert ds.sigma.dims == ("step", "layer", "kind", "group", "rank")
    assert ds["count"].dims == ("step", "group")
    assert ds.sigma_epoch.dims == ("epoch", "layer", "kind", "group", "rank")
    assert ds.welch_t.dims == ds.welch_p.dims == ("epoch", "layer", "kind", "pair", "rank")
    assert ds.step_epoch.dims == ("step",)

    assert ds.layer.values.tolist() == list(layout.layers)
    assert ds.group.values.tolist() == list(layout.groups)
    assert ds.kind.values.tolist() == list(KINDS)
    assert ds.pair.values.tolist() == list(layout.pairs)
    assert ds["rank"].values.tolist() == list(range(layout.rank))

    np.testing.assert_array_equal(ds.step, [s for s, _, _ in steps])
    np.testing.assert_array_equal(ds.step_epoch, [e for _, e, _ in steps])
    np.testing.assert_array_equal(ds.sigma, np.stack([r["sigma"] for _, _, r in steps]))
    np.testing.assert_array_equal(ds["count"], np.stack([r["count"] for _, _, r in steps]))
    np.testing.assert_array_equal(ds.epoch, [e for e, _ in epochs])
    for name in ("sigma_epoch", "welch_t", "welch_p"):
        np.testing.assert_array_equal(ds[name], np.stack([r[name] for _, r in epochs]))
    assert ds.sigma.dtype == np.float32 and ds["count"].dtype == np.int64
    assert ds.welch_p.dtype == np.float64 and float(ds.welch_p.min()) > 0  # tiny p kept

    assert ds.attrs["rank"] == layout.rank
    assert ds.attrs["normalize"] == layout.normalize
    assert ds.attrs["every"] == layout.every
    assert ds.attrs["model"] == layout.model
    assert ds.attrs["streamspec_version"] == __version__
    assert ds.attrs["created"].endswith("+00:00")
    # label-based selection works on the string coordinates
    assert ds.sigma.sel(layer="encoder.fc2", kind="adjoint", group="ünïcode").shape == (
        len(steps),
        layout.rank,
    )


def test_round_trip_on_disk(tmp_path, layout, step_row, epoch_row):
    path = tmp_path / "run.zarr"
    writer = ArchiveWriter(path, layout, chunk_steps=8, flush_every=5)
    steps, epochs = write_run(writer, step_row, epoch_row)
    writer.close()

    archive = open_archive(path)
    assert (archive.n_steps, archive.n_epochs) == (N_STEPS, len(epochs)) == (23, 2)
    assert archive.layers == layout.layers and archive.groups == layout.groups
    assert archive.kinds == KINDS and archive.pairs == layout.pairs
    assert (archive.rank, archive.normalize, archive.every) == (4, "mean", 2)
    assert archive.layout == layout
    check_dataset(archive.to_xarray(), layout, steps, epochs)

    raw = xr.open_zarr(path, consolidated=False)
    check_dataset(raw, layout, steps, epochs)
    assert raw.attrs["committed_steps"] == N_STEPS
    assert raw.attrs["committed_epochs"] == 2


def test_round_trip_in_memory(layout, step_row, epoch_row):
    writer = ArchiveWriter(None, layout, chunk_steps=8, flush_every=5)
    steps, epochs = write_run(writer, step_row, epoch_row)
    writer.close()
    check_dataset(writer.archive().to_xarray(), layout, steps, epochs)
    check_dataset(open_archive(writer.store).to_xarray(), layout, steps, epochs)
    check_dataset(xr.open_zarr(writer.store, consolidated=False), layout, steps, epochs)


def test_round_trip_fsspec_url(layout, step_row, epoch_row):
    pytest.importorskip("fsspec")
    url = f"memory://{uuid.uuid4().hex}.zarr"
    with ArchiveWriter(url, layout, chunk_steps=8, flush_every=5) as writer:
        steps, epochs = write_run(writer, step_row, epoch_row)
    check_dataset(open_archive(url).to_xarray(), layout, steps, epochs)


def test_one_group_has_no_pairs(tmp_path):
    layout = RunLayout(layers=("fc",), groups=("all",), rank=2)
    with ArchiveWriter(tmp_path / "one.zarr", layout) as writer:
        writer.append_step(
            {"sigma": np.ones(layout.step_shape), "count": np.array([8])}, step=0, epoch=0
        )
        empty = np.zeros(layout.pair_shape)
        writer.append_epoch(
            {"sigma_epoch": np.ones(layout.step_shape), "welch_t": empty, "welch_p": empty},
            epoch=0,
        )
    ds = open_archive(tmp_path / "one.zarr").to_xarray()
    assert ds.sizes["pair"] == 0 and ds.welch_p.shape == (1, 1, 3, 0, 2)
    assert ds.sigma.shape == (1, 1, 3, 1, 2) and float(ds.sigma.sum()) == 6.0


def test_archive_layout_on_disk(tmp_path, layout):
    """The zarr-level contract other tools rely on: dtypes, fill values, chunks, codecs, names."""
    path = tmp_path / "run.zarr"
    ArchiveWriter(path, layout, chunk_steps=8).close()
    group = zarr.open_group(path, mode="r")
    assert group.metadata.zarr_format == 3
    attrs = dict(group.attrs)
    assert attrs["layers"] == list(layout.layers) and attrs["groups"] == list(layout.groups)
    assert attrs["committed_steps"] == 0 and attrs["committed_epochs"] == 0
    names = set(group.array_keys())
    for v in ROW_VARIABLES:
        if v.optional:  # only archives whose layout asks for it (layout.extras) hold it
            assert v.name not in names
            continue
        array = group[v.name]
        assert array.metadata.dimension_names == v.dims
        assert array.dtype == np.dtype(v.dtype)
        assert array.shape[0] == 0
        assert array.chunks[1:] == tuple(max(n, 1) for n in array.shape[1:])  # first dim only
        assert any(isinstance(c, zarr.codecs.ZstdCodec) and c.level == 3 for c in array.compressors)
        if array.dtype.kind == "f":
            assert np.isnan(array.fill_value)
    assert group["sigma"].chunks[0] == 8
    assert group["sigma"].attrs["coordinates"] == "step_epoch"
    assert group["count"].attrs["coordinates"] == "step_epoch"
    for name in ("layer", "kind", "group", "pair"):
        assert group[name].metadata.to_dict()["data_type"] == "string"  # variable length
