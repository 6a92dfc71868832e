"""``export_archive``: one read-only ``.zip`` holding the committed rows, consolidated."""

from __future__ import annotations

import uuid
import warnings
import zipfile

import numpy as np
import pytest
import xarray as xr
import zarr

from streamspec.errors import StreamspecError
from streamspec.store import ArchiveWriter, export_archive, open_archive


@pytest.fixture
def run(tmp_path, layout, step_row, epoch_row):
    path = tmp_path / "run.zarr"
    with ArchiveWriter(path, layout, chunk_steps=4) as writer:
        for step in range(10):
            writer.append_step(step_row(step), step=step, epoch=step // 6)
            if step == 5:
                writer.append_epoch(epoch_row(0), epoch=0)
    return path


def test_export_round_trip(tmp_path, run):
    out = export_archive(run, tmp_path / "exports" / "run.zip")
    assert out == tmp_path / "exports" / "run.zip"
    names = zipfile.ZipFile(out).namelist()
    assert len(names) == len(set(names))  # every member written once
    assert not [n for n in names if n.endswith(".partial")]
    assert not list(out.parent.glob(".*partial"))

    exported = open_archive(out)
    xr.testing.assert_identical(exported.to_xarray(), open_archive(run).to_xarray())
    assert exported.layout == open_archive(run).layout
    exported.check()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(zarr.storage.ZipStore(out, mode="r"))  # consolidated
    assert ds.sizes["step"] == 10 and ds.sizes["epoch"] == 1


def test_export_holds_committed_rows_only(tmp_path, run):
    """A run killed mid-flush: rows above the commit counter are left out of the copy."""
    group = zarr.open_group(run, mode="r+")
    for name in ("step", "sigma"):
        group[name].resize((13, *group[name].shape[1:]))
        group[name][10:] = 99
    out = export_archive(run, tmp_path / "run.zip")
    raw = zarr.open_group(zarr.storage.ZipStore(out, mode="r"), mode="r")
    assert raw["sigma"].shape[0] == raw["step"].shape[0] == 10
    assert raw.attrs["committed_steps"] == 10
    np.testing.assert_array_equal(open_archive(out).to_xarray().step, np.arange(10))


def test_export_from_an_fsspec_url(tmp_path, layout, step_row):
    pytest.importorskip("fsspec")
    url = f"memory://{uuid.uuid4().hex}/run.zarr"
    with ArchiveWriter(url, layout) as writer:
        writer.append_step(step_row(0), step=0, epoch=0)
    out = export_archive(url, tmp_path / "run.zip")
    np.testing.assert_array_equal(open_archive(out).to_xarray().sigma[0], step_row(0)["sigma"])


def test_export_refuses_to_overwrite(tmp_path, run):
    out = tmp_path / "run.zip"
    out.write_bytes(b"precious")
    with pytest.raises(StreamspecError, match="never overwrites") as info:
        export_archive(run, out)
    assert str(out) in str(info.value)
    assert out.read_bytes() == b"precious"


def test_export_wants_a_zip_name(tmp_path, run):
    with pytest.raises(StreamspecError, match=r"ending in \.zip.*'.*run\.zip'"):
        export_archive(run, tmp_path / "run.zarr2")


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_export_of_something_that_is_not_an_archive(tmp_path, what):
    source = tmp_path / "thing"
    if what == "directory":
        source.mkdir()
        (source / "notes.txt").write_text("hello")
    with pytest.raises(StreamspecError, match="streamspec archive") as info:
        export_archive(source, tmp_path / "out.zip")
    assert str(source) in str(info.value)
    assert not (tmp_path / "out.zip").exists()


def test_opening_a_zip_that_is_missing_or_not_a_zip(tmp_path):
    with pytest.raises(StreamspecError, match="nothing there"):
        open_archive(tmp_path / "missing.zip")
    (tmp_path / "fake.zip").write_text("hello")
    with pytest.raises(StreamspecError, match="not a zip file"):
        open_archive(tmp_path / "fake.zip")
