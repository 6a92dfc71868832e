"""``kill -9`` at any moment: the archive opens, holds every flushed step, and a run resumes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import streamspec
from streamspec.errors import StreamspecError
from streamspec.layout import RunLayout
from streamspec.stats.welch import GroupWelch
from streamspec.store import ArchiveWriter, open_archive
from streamspec.store.schema import CREATING_ATTR

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # the workers' helpers (they run as scripts too)

import _train_worker as training  # noqa: E402
import _worker as rows  # noqa: E402


def run_until(args: list[str], word: str, at_least: int, timeout: float = 60.0) -> int:
    """Start a worker, wait until it printed ``<word> N`` with N >= at_least, SIGKILL it.

    Returns:
        The largest N it printed: that many steps were committed before the kill.
    """
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    announced, deadline = 0, time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        while announced < at_least and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:  # the worker died by itself
                break
            if line.startswith(word):
                announced = int(line.split()[1])
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: it does not wait for the next line
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    assert announced >= at_least, err
    return announced


def test_kill_9_of_a_watched_run_keeps_flushed_steps_and_resumes(tmp_path):
    path = tmp_path / "run.zarr"
    flushed = run_until([str(HERE / "_train_worker.py"), str(path)], "flushed", at_least=20)

    archive = streamspec.open(path)
    ds = archive.to_xarray().load()
    n = ds.sizes["step"]
    assert n >= flushed
    np.testing.assert_array_equal(ds.step, np.arange(n))  # no gap, no half-written row
    np.testing.assert_array_equal(ds.step_epoch, np.arange(n) // training.STEPS_PER_EPOCH)
    assert (ds["count"].values == training.BATCH // 3).all()
    assert np.isfinite(ds.sigma.sel(rank=0)).all()
    assert ds.sizes["epoch"] >= n // training.STEPS_PER_EPOCH - 1
    archive.check()

    # What a resumed run gets back of the unfinished epoch (the monitor feeds it to Welch).
    layout = archive.layout
    with ArchiveWriter(path, layout, resume=True) as writer:
        unfinished = writer.unfinished_epoch()
        assert unfinished.epoch == writer.start_epoch == ds.sizes["epoch"]
        in_epoch = ds.step_epoch.values == writer.start_epoch
        assert unfinished.n_steps == int(in_epoch.sum())
        np.testing.assert_array_equal(unfinished.sigma, ds.sigma.values[in_epoch])
        assert unfinished.sigma.dtype == np.float32
        GroupWelch(layout.step_shape).update_batch(unfinished.sigma)

    model = training.build()
    mon = streamspec.watch(
        model, training.GROUPS, training.RANK, store=path, live=False, resume=True
    )
    assert mon.step == n
    training.train(mon, model, steps=training.STEPS_PER_EPOCH, announce=False)
    mon.close()

    ds = streamspec.open(path).to_xarray()
    total = n + training.STEPS_PER_EPOCH
    np.testing.assert_array_equal(ds.step, np.arange(total))
    np.testing.assert_array_equal(ds.epoch, np.arange(ds.sizes["epoch"]))
    # Every step's epoch has its epoch row (close() wrote the last, partial one). One fewer than
    # the schedule's if the kill fell between an epoch's last steps and its row: the resumed run
    # then continued that epoch.
    assert int(ds.step_epoch[-1]) == ds.sizes["epoch"] - 1
    assert ds.sizes["epoch"] >= -(-total // training.STEPS_PER_EPOCH) - 1
    # Consolidated again at close, with the new shapes.
    assert xr.open_zarr(path).sizes["step"] == total


def test_kill_9_of_the_writer_again_and_again(tmp_path):
    """Sessions killed at random points in their flushes, each resuming the last."""
    path = tmp_path / "run.zarr"
    committed = 0
    for session in range(2):
        committed = run_until(
            ["-W", "error", str(HERE / "_worker.py"), "write", str(path)],
            "committed",
            at_least=committed + 30 + 11 * session,
        )
        archive = open_archive(path)
        ds = archive.to_xarray().load()
        assert ds.sizes["step"] >= committed
        assert rows.check(ds) == [], session
        archive.check()


def test_interrupted_creation_is_refused_by_readers_and_replaced_by_writers(tmp_path, layout):
    path = tmp_path / "run.zarr"
    group = zarr.create_group(path, zarr_format=3, attributes={CREATING_ATTR: "0.1"})
    group.create_array("layer", shape=(2,), dtype=str)  # killed after the first array
    with pytest.raises(StreamspecError, match="creation was interrupted") as info:
        open_archive(path)
    assert str(path) in str(info.value)
    with ArchiveWriter(path, layout) as writer:
        writer.append_step(
            {"sigma": np.ones(layout.step_shape), "count": np.ones(3)}, step=0, epoch=0
        )
    assert open_archive(path).n_steps == 1


def test_resume_removes_temporary_files_of_a_killed_write(tmp_path, layout, step_row):
    path = tmp_path / "run.zarr"
    with ArchiveWriter(path, layout, chunk_steps=4) as writer:
        for step in range(6):
            writer.append_step(step_row(step), step=step, epoch=0)
    left = [
        path / f"zarr.{'a' * 32}.partial",
        path / "sigma" / "c" / "1" / "0" / "0" / "0" / f"0.{'b' * 32}.partial",
    ]
    for file in left:
        file.write_bytes(b"half a file")
    open_archive(path).to_xarray()  # readers ignore them
    with ArchiveWriter(path, layout, resume=True):
        assert not any(file.exists() for file in left)
    assert (path / "sigma" / "c" / "1" / "0" / "0" / "0" / "0").exists()


def test_unfinished_epoch(tmp_path, layout, step_row, epoch_row):
    path = tmp_path / "run.zarr"
    with ArchiveWriter(path, layout, chunk_steps=4) as writer:
        assert writer.unfinished_epoch().n_steps == 0
        for step in range(0, 10, 2):
            writer.append_step(step_row(step), step=step, epoch=step // 6)
            if step == 4:
                writer.append_epoch(epoch_row(0), epoch=0)
    # Epoch 0 is closed; steps 6 and 8 of epoch 1 were committed, its epoch row never was.
    with ArchiveWriter(path, layout, resume=True) as writer:
        assert writer.start_epoch == 1
        unfinished = writer.unfinished_epoch()
        np.testing.assert_array_equal(unfinished.step, [6, 8])
        np.testing.assert_array_equal(unfinished.sigma[1], step_row(8)["sigma"])
        np.testing.assert_array_equal(unfinished.count[0], step_row(6)["count"])
        writer.append_step(step_row(10), step=10, epoch=1)
        writer.flush()
        assert writer.unfinished_epoch().n_steps == 2  # what was there when it opened
    assert open_archive(path).epoch_steps(1).n_steps == 3
    assert open_archive(path).epoch_steps(7).n_steps == 0


def test_a_zip_path_cannot_be_written(tmp_path):
    layout = RunLayout(layers=("fc",), groups=("all",), rank=2)
    with pytest.raises(StreamspecError, match="zip archives are read-only"):
        ArchiveWriter(tmp_path / "run.zip", layout)
    with pytest.raises(StreamspecError, match="zip archives are read-only"):
        ArchiveWriter(zarr.storage.ZipStore(tmp_path / "run.zip", mode="w"), layout)


def test_a_second_writer_of_a_live_archive_is_refused_until_the_first_is_gone(tmp_path):
    """Two writers of one archive at once (a job requeued while the first still runs, or two
    monitors on one path) interleaved their rows silently. The second is refused while the
    first lives — in another process or in this one — and resumes the archive as soon as the
    first has closed it or died (``kill -9``: the operating system drops its lock)."""
    path = tmp_path / "run.zarr"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_worker.py"), "write", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "committed N": the archive exists and is being written
        assert line.startswith("committed"), proc.stderr.read() if proc.stderr else line
        with pytest.raises(StreamspecError, match="no other writer of the archive"):
            ArchiveWriter(path, rows.LAYOUT, resume=True)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    with ArchiveWriter(path, rows.LAYOUT, resume=True) as first:
        with pytest.raises(StreamspecError, match="no other writer of the archive"):
            ArchiveWriter(path, rows.LAYOUT, resume=True)
        assert first.archive().n_steps >= 1
    with ArchiveWriter(path, rows.LAYOUT, resume=True):
        pass  # closed: free again
    fresh = tmp_path / "refused.zarr"
    with ArchiveWriter(fresh, rows.LAYOUT), pytest.raises(StreamspecError, match="no other"):
        ArchiveWriter(fresh, rows.LAYOUT)
