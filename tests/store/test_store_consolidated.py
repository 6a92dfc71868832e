"""Consolidated metadata: written at close, removed before a resumed run grows, never trusted by
streamspec's own readers; and a watched run through an fsspec URL."""

from __future__ import annotations

import uuid
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from torch import nn

import streamspec
from streamspec.store import ArchiveWriter, open_archive


def write(writer, step_row, steps, epoch=0):
    for step in steps:
        writer.append_step(step_row(step), step=step, epoch=epoch)


def consolidated(store) -> dict | None:
    """The consolidated metadata in the root ``zarr.json`` (None if there is none)."""
    metadata = zarr.open_group(store, mode="r", use_consolidated=False).metadata
    raw = zarr.open_group(store, mode="r").metadata
    assert metadata.consolidated_metadata is None  # use_consolidated=False drops it
    return None if raw.consolidated_metadata is None else raw.consolidated_metadata.metadata


def test_close_consolidates_so_xarray_defaults_work(tmp_path, layout, step_row, epoch_row):
    path = tmp_path / "run.zarr"
    with ArchiveWriter(path, layout, chunk_steps=4) as writer:
        write(writer, step_row, range(6))
        assert consolidated(path) is None  # not while the run is live
        writer.append_epoch(epoch_row(0), epoch=0)
    assert consolidated(path)["sigma"].shape[0] == 6
    expected = open_archive(path).to_xarray()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "failed to open consolidated metadata" fallback
        ds = xr.open_zarr(path)
        tree = xr.open_datatree(path, engine="zarr")
    np.testing.assert_array_equal(ds.sigma, expected.sigma)
    np.testing.assert_array_equal(ds.welch_p, expected.welch_p)
    np.testing.assert_array_equal(tree["sigma"], expected.sigma)
    assert tree.to_dataset().sizes["step"] == 6


def test_resume_removes_consolidated_metadata_before_anything_grows(tmp_path, layout, step_row):
    path = tmp_path / "run.zarr"
    with ArchiveWriter(path, layout) as writer:
        write(writer, step_row, range(3))
    assert consolidated(path) is not None

    writer = ArchiveWriter(path, layout, resume=True, flush_every=2)
    assert consolidated(path) is None  # gone as the writer opens
    write(writer, step_row, range(3, 8))
    writer.flush()
    # Any reader, with any defaults, now sees the grown arrays (no stale copy left to find).
    assert zarr.open_group(path, mode="r")["sigma"].shape[0] == 8
    assert xr.open_zarr(path, consolidated=False).sizes["step"] == 8
    with pytest.raises(Exception, match="[Cc]onsolidated"):
        xr.open_zarr(path, consolidated=True)
    writer.close()
    assert consolidated(path)["sigma"].shape[0] == 8
    assert xr.open_zarr(path).sizes["step"] == 8


def test_streamspec_readers_never_read_consolidated_metadata(tmp_path, layout, step_row):
    """Even stale consolidated metadata (another tool consolidated a live run) is not used."""
    path = tmp_path / "run.zarr"
    writer = ArchiveWriter(path, layout, flush_every=2)
    write(writer, step_row, range(2))
    writer.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: "not part of the Zarr v3 specification"
        zarr.consolidate_metadata(path)
    write(writer, step_row, range(2, 6))
    writer.flush()
    archive = open_archive(path)
    assert archive.n_steps == 6
    np.testing.assert_array_equal(archive.to_xarray().step, np.arange(6))
    np.testing.assert_array_equal(archive.epoch_steps(0).step, np.arange(6))
    archive.check()
    writer.close()


def tiny_run(store, *, steps: int, resume: bool = False) -> streamspec.Monitor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    mon = streamspec.watch(model, ["x", "y"], 3, store=store, live=False, resume=resume)
    data = torch.Generator().manual_seed(mon.step)
    for _ in range(steps):
        mon.label(torch.tensor([0, 1] * 4))
        loss = model(torch.randn(8, 6, generator=data)).square().mean()
        model.zero_grad()
        loss.backward()
    mon.end_epoch()
    mon.close()
    return mon


def test_watch_round_trip_through_an_fsspec_url():
    pytest.importorskip("fsspec")
    url = f"memory://{uuid.uuid4().hex}/run.zarr"
    mon = tiny_run(url, steps=5)
    ds = streamspec.open(url).to_xarray()
    assert ds.sizes["step"] == 5 and ds.sizes["epoch"] == 1
    assert ds.sigma.shape == (5, 2, 3, 2, 3)
    np.testing.assert_array_equal(ds.layer, list(mon.layers))
    np.testing.assert_array_equal(ds.group, ["x", "y"])
    assert np.isfinite(ds.sigma.sel(rank=0)).all()
    assert xr.open_zarr(url).sizes["step"] == 5  # consolidated at close

    tiny_run(url, steps=3, resume=True)
    ds = streamspec.open(url).to_xarray()
    np.testing.assert_array_equal(ds.step, np.arange(8))
    np.testing.assert_array_equal(ds.epoch, [0, 1])
    streamspec.open(url).check()
