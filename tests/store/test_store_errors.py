"""Usage errors say what was expected, what was got and how to fix it; write errors are reported
(never raised into training: see test_writer_failures.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr

from streamspec.errors import StreamspecError, StreamspecWarning
from streamspec.store import ArchiveWriter, open_archive


class FailingStore(zarr.storage.MemoryStore):
    """An in-memory store whose writes fail once ``fail`` is set (a full or read-only disk)."""

    fail = False

    async def set(self, key, value, byte_range=None):
        if self.fail:
            raise OSError(f"injected failure writing {key}")
        await super().set(key, value, byte_range)


def test_existing_archive_is_never_overwritten(tmp_path, layout):
    path = tmp_path / "run.zarr"
    ArchiveWriter(path, layout).close()
    with pytest.raises(StreamspecError, match="resume=True") as info:
        ArchiveWriter(path, layout)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("what", ["file", "directory", "zarr group", "zarr array"])
def test_path_that_is_not_an_archive(tmp_path, layout, what):
    path = tmp_path / "thing"
    if what == "file":
        path.write_text("hello")
    elif what == "directory":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    elif what == "zarr group":
        zarr.create_group(path, zarr_format=3, attributes={"author": "someone else"})
    else:
        zarr.create_array(path, shape=(3,), dtype="int64")
    for attempt in (
        lambda: ArchiveWriter(path, layout),
        lambda: ArchiveWriter(path, layout, resume=True),
        lambda: open_archive(path),
    ):
        with pytest.raises(StreamspecError, match="streamspec archive") as info:
            attempt()
        assert str(path) in str(info.value)
    if what == "zarr group":
        assert "'streamspec_version'" in str(info.value)  # says what is missing


def test_open_archive_on_nothing(tmp_path):
    with pytest.raises(StreamspecError, match="nothing there"):
        open_archive(tmp_path / "missing.zarr")
    with pytest.raises(StreamspecError, match="nothing there"):
        open_archive(zarr.storage.MemoryStore())
    with pytest.raises(StreamspecError, match="a path, an fsspec URL or a zarr store"):
        open_archive(42)


@pytest.mark.parametrize("array", ["layer", "group"])
def test_an_archive_missing_a_coordinate_array_says_so(tmp_path, layout, array):
    """A damaged archive (a coordinate array deleted) is named, not a raw ``KeyError``."""
    import shutil

    path = tmp_path / "run.zarr"
    ArchiveWriter(path, layout).close()
    shutil.rmtree(path / array)
    with pytest.raises(StreamspecError, match=f"array '{array}' in a streamspec archive"):
        open_archive(path)


def test_a_store_below_a_file_says_so(tmp_path, layout):
    (tmp_path / "a_file").write_text("hello")
    with pytest.raises(StreamspecError, match="a writable place for a new archive"):
        ArchiveWriter(tmp_path / "a_file" / "run.zarr", layout)


def test_a_url_of_an_unknown_protocol_says_so():
    pytest.importorskip("fsspec")
    with pytest.raises(StreamspecError, match="protocol fsspec knows"):
        open_archive("nosuchscheme://run.zarr")


def test_resume_with_another_layout_lists_the_differences(tmp_path, layout):
    path = tmp_path / "run.zarr"
    ArchiveWriter(path, layout).close()
    other = dataclasses.replace(layout, groups=("cats", "dogs"), rank=8)
    with pytest.raises(StreamspecError) as info:
        ArchiveWriter(path, other, resume=True)
    message = str(info.value)
    assert "groups: archive ['cats', 'dogs', 'ünïcode'], layout ['cats', 'dogs']" in message
    assert "rank: archive 4, layout 8" in message
    assert "layers" not in message  # only what differs


def test_rows_are_checked_before_buffering(layout, step_row):
    writer = ArchiveWriter(None, layout)
    good = step_row(0)
    with pytest.raises(StreamspecError, match=r"sigma of shape \[2, 3, 3, 4\]"):
        writer.append_step({**good, "sigma": good["sigma"][..., :3]}, step=0, epoch=0)
    with pytest.raises(StreamspecError, match=r"missing \['sigma'\], unknown \['sigmaa'\]"):
        writer.append_step({"sigmaa": good["sigma"], "count": good["count"]}, step=0, epoch=0)
    writer.append_step(good, step=5, epoch=1)
    with pytest.raises(StreamspecError, match="step > 5"):
        writer.append_step(good, step=5, epoch=1)
    with pytest.raises(StreamspecError, match="epoch >= 1"):
        writer.append_step(good, step=6, epoch=0)
    with pytest.raises(StreamspecError, match="welch_t"):
        writer.append_epoch({"sigma_epoch": good["sigma"]}, epoch=0)
    writer.close()
    with pytest.raises(StreamspecError, match="closed"):
        writer.append_step(good, step=7, epoch=1)
    assert writer.archive().n_steps == 1  # the bad rows were never written


def test_rows_are_copied(layout, step_row):
    writer = ArchiveWriter(None, layout)
    row = step_row(0)
    writer.append_step(row, step=0, epoch=0)
    expected = row["sigma"].copy()
    row["sigma"][:] = -1  # the caller reuses its buffer
    writer.close()
    np.testing.assert_array_equal(writer.archive().to_xarray().sigma[0], expected)


def test_background_error_is_reported_on_close_never_raised(layout, step_row, monkeypatch):
    from streamspec.store import writer as writer_module

    monkeypatch.setattr(writer_module, "_RETRY_DELAYS", ())  # one attempt per block
    store = FailingStore()
    writer = ArchiveWriter(store, layout, flush_every=2)
    writer.append_step(step_row(0), step=0, epoch=0)
    writer.append_step(step_row(1), step=1, epoch=0)  # flushed in the background: fine
    writer.flush()
    store.fail = True
    with pytest.warns(StreamspecWarning) as record:
        for step in range(2, 7):  # two failing flushes, then a buffered row: none may raise
            writer.append_step(step_row(step), step=step, epoch=0)
        writer.flush()
        assert writer.lost_rows == {"step": 5, "epoch": 0}
        writer.close()
    first, summary = (str(w.message) for w in record)
    assert "steps 2..3" in first and "injected failure" in first
    assert "5 step rows (steps 2..6) were not written" in summary
    writer.close()  # closing again is harmless, and reports nothing more
    store.fail = False
    assert open_archive(store).n_steps == 2  # only the rows before the failure are committed


def test_close_twice_and_context_manager(tmp_path, layout, step_row):
    with ArchiveWriter(tmp_path / "run.zarr", layout) as writer:
        writer.append_step(step_row(0), step=0, epoch=0)
    writer.close()
    writer.close()
    assert open_archive(tmp_path / "run.zarr").n_steps == 1
