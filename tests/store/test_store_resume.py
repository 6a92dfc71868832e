"""A resumed run continues after the committed rows and drops rows an interrupted flush left."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from streamspec.store import ArchiveWriter, open_archive


def write(writer, step_row, steps, epoch):
    for step in steps:
        writer.append_step(step_row(step), step=step, epoch=epoch)


def test_resume_continues_after_committed_rows(tmp_path, layout, step_row, epoch_row):
    path = tmp_path / "run.zarr"
    with ArchiveWriter(path, layout, flush_every=4) as first:
        assert (first.start_step, first.start_epoch) == (0, 0)
        write(first, step_row, range(0, 20, 2), epoch=0)
        first.append_epoch(epoch_row(0), epoch=0)

    with ArchiveWriter(path, layout, resume=True, flush_every=4) as second:
        assert (second.start_step, second.start_epoch) == (19, 1)
        with pytest.raises(ValueError, match="step > 18"):
            second.append_step(step_row(18), step=18, epoch=1)
        write(second, step_row, range(20, 30, 2), epoch=1)
        second.append_epoch(epoch_row(1), epoch=1)

    ds = open_archive(path).to_xarray()
    np.testing.assert_array_equal(ds.step, np.arange(0, 30, 2))
    np.testing.assert_array_equal(ds.step_epoch, [0] * 10 + [1] * 5)
    np.testing.assert_array_equal(ds.epoch, [0, 1])
    np.testing.assert_array_equal(ds.sigma[12], step_row(24)["sigma"])
    np.testing.assert_array_equal(ds.welch_p[1], epoch_row(1)["welch_p"])
    assert ds.attrs["created"] == open_archive(path).attrs["created"]  # not rewritten


def test_resume_drops_rows_of_an_interrupted_flush(tmp_path, layout, step_row):
    path = tmp_path / "run.zarr"
    with ArchiveWriter(path, layout) as writer:
        write(writer, step_row, range(5), epoch=0)
    # A crash in the middle of a flush of rows 5..7: two arrays grown and written, two not.
    group = zarr.open_group(path, mode="r+")
    for name in ("step", "sigma"):
        group[name].resize((8, *group[name].shape[1:]))
        group[name][5:] = 99
    with pytest.raises(ValueError, match="conflicting sizes"):
        xr.open_zarr(path, consolidated=False)  # xarray cannot align the raw arrays
    ds = open_archive(path).to_xarray()  # but the committed rows are readable
    assert ds.sizes["step"] == 5 and float(ds.sigma.max()) < 5

    with ArchiveWriter(path, layout, resume=True) as writer:
        assert writer.start_step == 5
        assert zarr.open_group(path, mode="r")["sigma"].shape[0] == 5  # truncated
        write(writer, step_row, range(5, 7), epoch=0)
    ds = open_archive(path).to_xarray()
    np.testing.assert_array_equal(ds.step, np.arange(7))
    np.testing.assert_array_equal(ds["count"][:, 0], np.arange(7))


def test_resume_of_a_missing_archive_creates_it(tmp_path, layout, step_row):
    with ArchiveWriter(tmp_path / "new.zarr", layout, resume=True) as writer:
        assert (writer.start_step, writer.start_epoch) == (0, 0)
        write(writer, step_row, range(3), epoch=0)
    assert open_archive(tmp_path / "new.zarr").n_steps == 3


def test_resume_in_memory_store(layout, step_row):
    store = zarr.storage.MemoryStore()
    with ArchiveWriter(store, layout) as writer:
        write(writer, step_row, range(3), epoch=0)
    with pytest.raises(ValueError, match="resume=True"):
        ArchiveWriter(store, layout)
    with ArchiveWriter(store, layout, resume=True) as writer:
        assert writer.start_step == 3
        write(writer, step_row, range(3, 6), epoch=0)
    assert open_archive(store).n_steps == 6


def test_a_new_variable_is_one_table_line(tmp_path, layout, step_row, monkeypatch):
    """Schema growth: an archive written before ``sigma_bound`` existed gains it on resume."""
    from streamspec.store import schema

    path = tmp_path / "run.zarr"
    with ArchiveWriter(path, layout) as writer:
        write(writer, step_row, range(2), epoch=0)

    sigma_bound = schema.RowVariable(
        "sigma_bound", ("step", "layer", "kind", "group", "rank"), "float32", required=False
    )
    monkeypatch.setattr(schema, "ROW_VARIABLES", (*schema.ROW_VARIABLES, sigma_bound))
    err = np.full(layout.step_shape, 0.5, dtype=np.float32)
    with ArchiveWriter(path, layout, resume=True) as writer:
        writer.append_step({**step_row(2), "sigma_bound": err}, step=2, epoch=0)
        writer.append_step(step_row(3), step=3, epoch=0)  # optional: left out

    ds = open_archive(path).to_xarray()
    assert ds.sigma_bound.dims == ds.sigma.dims
    assert "step_epoch" in ds.sigma_bound.coords
    assert np.isnan(ds.sigma_bound[[0, 1, 3]]).all()  # rows before it existed, and left out
    np.testing.assert_array_equal(ds.sigma_bound[2], err)


def test_resume_with_a_different_tied_setting_is_refused(tmp_path) -> None:
    """``tied=True`` then a resume without it left ``sigma_tied`` short of ``sigma``: the archive
    no longer opened. The layouts must match, as for layers and groups."""
    import torch
    from torch import nn

    import streamspec

    path = tmp_path / "run.zarr"
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(24, 2))
    for tied, resume in ((True, False), (False, True)):
        try:
            with streamspec.watch(
                model, ["a", "b"], rank=2, live=False, store=path, tied=tied, resume=resume
            ) as mon:
                mon.label(torch.tensor([0, 1]))
                model(torch.randn(2, 2, 8)).sum().backward()
        except streamspec.StreamspecError as error:
            assert resume and "extras" in str(error)
        else:
            assert not resume
    assert streamspec.open(path).to_xarray().sizes["step"] == 1


def test_resume_of_a_run_recording_every_nth_step_continues_the_true_step_count(tmp_path):
    """A closed run with every=10 that trained 25 steps (recorded 0, 10, 20) resumes at step 25,
    not at 21: the resumed run's step 30 is its 6th iteration (its group counts tell which)."""
    import torch
    from torch import nn

    import streamspec

    path = tmp_path / "run.zarr"
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(10, 4)

    def train(steps: int, resume: bool) -> None:
        with streamspec.watch(
            model, ["a", "b"], rank=2, live=False, store=path, every=10, resume=resume
        ) as mon:
            for j in range(steps):
                i = j % 10  # iteration j of a run: i + 1 samples in group "a"
                labels = torch.tensor([0] * (i + 1) + [1] * (9 - i))
                mon.label(labels)
                model(x).pow(2).mean().backward()

    train(25, resume=False)
    train(10, resume=True)
    ds = streamspec.open(path).to_xarray()
    assert ds["step"].values.tolist() == [0, 10, 20, 30]
    assert int(ds["count"].sel(step=30).values[0]) == 6  # the resumed run's iteration 5


def test_resume_with_another_every_says_so_and_updates_the_attribute(tmp_path):
    """A run recorded every step, resumed recording every 5th: the archive's ``every`` kept the
    first session's 1 without a word. It tells the latest session's now, with a warning."""
    import torch
    from torch import nn

    import streamspec
    from streamspec.errors import StreamspecWarning

    path = tmp_path / "run.zarr"
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    def train(every: int, resume: bool) -> None:
        with streamspec.watch(
            model, ["a", "b"], rank=2, live=False, store=path, every=every, resume=resume
        ) as mon:
            for _ in range(10):
                mon.label(torch.arange(6) % 2)
                model(torch.randn(6, 4)).pow(2).mean().backward()

    train(1, resume=False)
    with pytest.warns(StreamspecWarning, match="recorded every 1 step"):
        train(5, resume=True)
    ds = streamspec.open(path).to_xarray()
    assert ds.attrs["every"] == 5
    assert ds["step"].values.tolist() == [*range(10), 10, 15]
