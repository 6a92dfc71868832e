"""``Archive.check()`` finds a missing or damaged chunk and names it."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from streamspec.errors import StreamspecError
from streamspec.layout import RunLayout
from streamspec.store import ArchiveWriter, open_archive

CHUNK = 4


@pytest.fixture
def run(tmp_path, layout, step_row, epoch_row):
    """An archive with 10 steps in chunks of 4 (the last one partly filled) and one epoch."""
    path = tmp_path / "run.zarr"
    with ArchiveWriter(path, layout, chunk_steps=CHUNK) as writer:
        for step in range(10):
            writer.append_step(step_row(step), step=step, epoch=0)
        writer.append_epoch(epoch_row(0), epoch=0)
    return path


def sigma_chunk(path, index):
    return path / "sigma" / "c" / str(index) / "0" / "0" / "0" / "0"


def test_a_sound_archive_passes(run):
    open_archive(run).check()


def test_chunks_of_fill_values_are_written_so_none_is_missing(tmp_path):
    """Rank 1 (``rank`` = [0], zarr's default fill) and an optional variable never filled."""
    layout = RunLayout(layers=("fc",), groups=("a", "b"), rank=1, extras=("sigma_tied",))
    path = tmp_path / "run.zarr"
    with ArchiveWriter(path, layout) as writer:
        row = {"sigma": np.full(layout.step_shape, np.nan), "count": np.zeros(2)}
        writer.append_step(row, step=0, epoch=0)
    assert (path / "rank" / "c" / "0").exists()
    assert (path / "sigma_tied" / "c" / "0" / "0" / "0" / "0").exists()
    open_archive(path).check()


def test_a_missing_chunk_is_named(run):
    sigma_chunk(run, 1).unlink()
    # zarr itself reads a missing chunk as fill values: only check() can tell.
    assert np.isnan(open_archive(run).to_xarray().sigma[4:8]).all()
    with pytest.raises(StreamspecError) as info:
        open_archive(run).check()
    message = str(info.value)
    assert "'sigma'" in message and "'sigma/c/1/0/0/0/0'" in message and "missing" in message
    assert "step rows 4..7" in message
    assert str(run) in message


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_chunk_is_named(run, damage):
    chunk = sigma_chunk(run, 2)  # the partly filled last chunk
    data = bytearray(chunk.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF  # caught by the zstd checksum if not by the decoder
    else:
        del data[len(data) // 2 :]
    chunk.write_bytes(bytes(data))
    with pytest.raises(StreamspecError, match=r"'sigma/c/2/0/0/0/0'.*does not decode"):
        open_archive(run).check()


def test_a_damaged_coordinate_is_named(run):
    (run / "layer" / "c" / "0").write_bytes(b"not zstd")
    with pytest.raises(StreamspecError, match=r"array 'layer'.*'layer/c/0'.*does not decode"):
        open_archive(run)  # read as it opens


def test_indices_that_go_back_are_named(run):
    zarr.open_array(run / "step", mode="r+")[5] = 2
    with pytest.raises(
        StreamspecError, match=r"array 'step'.* increasing; got 4 then 2 at rows 4, 5"
    ):
        open_archive(run).check()
