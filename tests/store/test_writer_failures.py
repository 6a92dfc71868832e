"""Storage and host failures never stop training.

A failed block write is retried, then only that block is lost: later blocks are written, the
commit counters never claim a lost row, one warning says so when it happens and ``close()`` sums
it up. A variable added on resume gets fill values for its past rows. The writer's queue is
bounded (a slow store slows the submitter instead of piling rows up in memory). A step whose
spectra fail on the host thread is recorded as NaN.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from torch import nn

import streamspec
from streamspec import pipeline
from streamspec.analysis import load
from streamspec.errors import StreamspecWarning
from streamspec.store import ArchiveWriter, open_archive
from streamspec.store import writer as writer_module


class FlakyStore(zarr.storage.MemoryStore):
    """An in-memory store whose next ``failures`` writes under ``prefix`` raise OSError.

    ``failures = -1`` fails every such write (a full disk); ``delay`` slows every write down.
    """

    failures = 0
    prefix = ""
    delay = 0.0

    async def set(self, key, value, byte_range=None):
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures and key.startswith(self.prefix):
            self.failures -= self.failures > 0
            raise OSError(f"injected failure writing {key}")
        await super().set(key, value, byte_range)


class BreakableStore(zarr.storage.LocalStore):
    """A local store (reopened by path on resume) whose writes under ``prefix`` raise OSError
    while ``broken``."""

    broken = False
    prefix = ""

    async def set(self, key, value):  # type: ignore[no-untyped-def]
        if self.broken and key.startswith(self.prefix):
            raise OSError("injected: the disk went away")
        await super().set(key, value)


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch):
    """Retries without waiting, so that these tests stay fast (``raising=False``: the tests
    also run, and fail, on a writer without retries)."""
    monkeypatch.setattr(writer_module, "_RETRY_DELAYS", (0.0, 0.0), raising=False)


ATTEMPTS = 3  # what one block gets: the first write and two retries


def write(writer, step_row, steps, epoch=0):
    for step in steps:
        writer.append_step(step_row(step), step=step, epoch=epoch)


def messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, StreamspecWarning)]


def test_a_transient_failure_is_retried_and_loses_nothing(layout, step_row):
    store = FlakyStore()
    writer = ArchiveWriter(store, layout, flush_every=2)
    write(writer, step_row, range(2))
    writer.flush()
    store.failures = ATTEMPTS - 1  # the last attempt succeeds
    write(writer, step_row, range(2, 6))
    writer.close()  # no warning (an error under this suite's filters), no exception
    archive = open_archive(store)
    np.testing.assert_array_equal(archive.to_xarray().step, np.arange(6))
    archive.check()


@pytest.mark.parametrize("prefix", ["", "sigma/c/", "zarr.json"], ids=["grow", "data", "commit"])
def test_a_lost_block_is_warned_once_and_later_blocks_are_written(
    layout, step_row, epoch_row, prefix
):
    """The block of steps 2..3 fails on every attempt: as it grows the arrays, half-way through
    its data (the arrays already grown), or at its commit (the counter already changed in
    memory, where the next commit must not publish it)."""
    store = FlakyStore()
    store.prefix = prefix
    writer = ArchiveWriter(store, layout, flush_every=2)
    with pytest.warns(StreamspecWarning) as record:
        write(writer, step_row, range(2))
        writer.flush()  # never raises: training goes on
        store.failures = ATTEMPTS
        write(writer, step_row, range(2, 4))
        writer.flush()
        write(writer, step_row, range(4, 8))
        writer.flush()
        writer.append_epoch(epoch_row(0), epoch=0)
        writer.close()
    first, *rest = messages(record)
    assert "steps 2..3" in first and "injected failure" in first
    assert len(rest) == 1  # one warning as it happens, one summary at close
    assert "2 step rows (steps 2..3)" in rest[0] and "were not written" in rest[0]
    archive = open_archive(store)
    archive.check()  # the counters claim no lost row; every committed chunk is there
    ds = archive.to_xarray()
    np.testing.assert_array_equal(ds.step, [0, 1, 4, 5, 6, 7])
    np.testing.assert_array_equal(ds.sigma[2], step_row(4)["sigma"])
    np.testing.assert_array_equal(ds.welch_p[0], epoch_row(0)["welch_p"])
    assert xr.open_zarr(store).sizes["step"] == 6  # consolidated, with consistent shapes


def test_a_lost_last_block_leaves_consistent_shapes(layout, step_row):
    """The last block fails after growing the arrays: close() cuts them back to the committed
    rows before consolidating, so ``xarray.open_zarr`` with its defaults still aligns them."""
    store = FlakyStore()
    store.prefix = "sigma/c/"
    writer = ArchiveWriter(store, layout, flush_every=2)
    write(writer, step_row, range(2))
    writer.flush()
    store.failures = -1
    with pytest.warns(StreamspecWarning) as record:
        write(writer, step_row, range(2, 4))
        writer.close()
    assert "2 step rows (steps 2..3) were not written" in messages(record)[-1]
    assert xr.open_zarr(store).sizes["step"] == 2
    open_archive(store).check()


def test_a_store_that_never_recovers_never_raises(layout, step_row, epoch_row):
    store = FlakyStore()
    writer = ArchiveWriter(store, layout, flush_every=2)
    store.failures = -1
    with pytest.warns(StreamspecWarning) as record:
        write(writer, step_row, range(5))
        writer.flush()
        writer.append_epoch(epoch_row(0), epoch=0)
        writer.flush()
        writer.close()  # consolidating fails too: a warning, not an exception
    summary = " ".join(messages(record)[1:])
    assert "5 step rows (steps 0..4) and 1 epoch row (epoch 0) were not written" in summary
    store.failures = 0
    archive = open_archive(store)
    assert (archive.n_steps, archive.n_epochs) == (0, 0)
    archive.check()


def test_watch_never_raises_a_storage_failure_into_training():
    """``end_epoch()`` and ``flush()`` of a watched run whose store fails keep training going;
    ``close()`` says how many steps were lost."""
    store = FlakyStore()
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.warns(StreamspecWarning) as record:
        mon = streamspec.watch(model, ["a", "b"], rank=2, live=False, store=store)
        store.failures = -1
        for _epoch in range(2):
            for _ in range(3):
                mon.label(torch.tensor([0, 1, 0, 1]))
                model(torch.randn(4, 4)).sum().backward()
            mon.flush()
            mon.end_epoch()
        mon.close()
    assert any("6 step rows (steps 0..5)" in m for m in messages(record))
    store.failures = 0
    open_archive(store).check()


# ---------------------------------------------------------------------- variables added on resume


def test_an_extra_variable_added_on_resume_fills_its_past_rows(tmp_path, layout, step_row):
    path = tmp_path / "run.zarr"
    with ArchiveWriter(path, layout, chunk_steps=2) as writer:
        write(writer, step_row, range(3))
    tied = dataclasses.replace(layout, extras=("sigma_tied",))
    values = np.full((len(layout.layers), len(layout.groups), layout.rank), 0.5, np.float32)
    with ArchiveWriter(path, tied, resume=True, chunk_steps=2) as writer:
        writer.append_step({**step_row(3), "sigma_tied": values}, step=3, epoch=0)
        writer.append_step(step_row(4), step=4, epoch=0)
    archive = open_archive(path)
    archive.check()  # every chunk of the past rows is there
    assert archive.attrs["extras"] == ["sigma_tied"]
    assert archive.layout.extras == ("sigma_tied",)
    ds = archive.to_xarray()
    assert np.isnan(ds.sigma_tied[[0, 1, 2, 4]]).all()
    np.testing.assert_array_equal(ds.sigma_tied[3], values)
    with ArchiveWriter(path, tied, resume=True) as writer:  # resumes again with it
        assert writer.start_step == 5


def test_a_resume_that_stops_while_filling_is_finished_by_the_next(layout, step_row):
    store = FlakyStore()
    with ArchiveWriter(store, layout, chunk_steps=2) as writer:
        write(writer, step_row, range(5))
    tied = dataclasses.replace(layout, extras=("sigma_tied",))
    store.prefix, store.failures = "sigma_tied/c/1/", -1  # the second chunk of the past rows
    with pytest.raises(OSError, match="injected failure"):
        ArchiveWriter(store, tied, resume=True, chunk_steps=2)
    store.failures = 0
    with ArchiveWriter(store, tied, resume=True, chunk_steps=2) as writer:
        assert writer.start_step == 5
    archive = open_archive(store)
    archive.check()
    assert np.isnan(archive.to_xarray().sigma_tied).all()


_UNFINISHED = r"not damaged.*'sigma_tied' \(2 chunks not filled yet\).*next resume"


def test_check_after_a_resume_stopped_while_filling_reports_an_unfinished_fill(layout, step_row):
    """A resume killed while filling an added variable's past rows left chunks of it missing:
    ``check()`` called that damage. It now warns that the fill is unfinished (the next resume
    finishes it), and the archive reads, the unfilled rows as NaN."""
    store = FlakyStore()
    with ArchiveWriter(store, layout, chunk_steps=2) as writer:
        write(writer, step_row, range(5))
    tied = dataclasses.replace(layout, extras=("sigma_tied",))
    store.prefix, store.failures = "sigma_tied/c/1/", -1  # chunks 1 and 2 of 3 never written
    with pytest.raises(OSError, match="injected failure"):
        ArchiveWriter(store, tied, resume=True, chunk_steps=2)
    store.failures = 0
    archive = open_archive(store)
    with pytest.warns(StreamspecWarning, match=_UNFINISHED):
        archive.check()
    with pytest.warns(StreamspecWarning, match=_UNFINISHED):
        ds = load(store)  # which checks first
    assert np.isnan(ds.sigma_tied).all()
    np.testing.assert_array_equal(ds.sigma[4], step_row(4)["sigma"])
    with ArchiveWriter(store, tied, resume=True, chunk_steps=2):
        pass
    open_archive(store).check()  # finished: no warning (an error under this suite's filters)


def test_check_during_a_resume_s_fill_reports_an_unfinished_fill(layout, step_row):
    """``check()`` from another thread while a resume is filling: the same report, not damage."""

    class PausingStore(zarr.storage.MemoryStore):
        """Holds the write of ``sigma_tied``'s chunk 1 until ``release`` is set (events of the
        class: zarr makes copies of a store, e.g. read-only ones)."""

        reached, release = threading.Event(), threading.Event()

        async def set(self, key, value, byte_range=None):
            if key.startswith("sigma_tied/c/1/"):
                self.reached.set()
                while not self.release.is_set():  # yields zarr's event loop to the reader
                    await asyncio.sleep(0.01)
            await super().set(key, value, byte_range)

    store = PausingStore()
    with ArchiveWriter(store, layout, chunk_steps=2) as writer:
        write(writer, step_row, range(5))
    tied = dataclasses.replace(layout, extras=("sigma_tied",))
    resumed: list[ArchiveWriter] = []
    filling = threading.Thread(
        target=lambda: resumed.append(ArchiveWriter(store, tied, resume=True, chunk_steps=2))
    )
    filling.start()
    try:
        assert store.reached.wait(10)
        archive = open_archive(store)
        with pytest.warns(StreamspecWarning, match=_UNFINISHED):
            archive.check()
        assert np.isnan(archive.to_xarray().sigma_tied).all()
    finally:
        store.release.set()
        filling.join(10)
    (writer,) = resumed
    writer.close()
    open_archive(store).check()


def test_a_variable_newer_than_the_archive_passes_check(tmp_path, layout, step_row, monkeypatch):
    """Schema growth (a variable added to ``ROW_VARIABLES``) on resume: its past chunks are
    written, so ``check()`` does not mistake them for lost ones."""
    from streamspec.store import schema

    path = tmp_path / "run.zarr"
    with ArchiveWriter(path, layout, chunk_steps=2) as writer:
        write(writer, step_row, range(5))
    sigma_bound = schema.RowVariable(
        "sigma_bound", ("step", "layer", "kind", "group", "rank"), "float32", required=False
    )
    monkeypatch.setattr(schema, "ROW_VARIABLES", (*schema.ROW_VARIABLES, sigma_bound))
    with ArchiveWriter(path, layout, resume=True, chunk_steps=2) as writer:
        write(writer, step_row, range(5, 6))
    archive = open_archive(path)
    archive.check()
    assert np.isnan(archive.to_xarray().sigma_bound).all()


# ---------------------------------------------------------------------- bounded queue


def test_a_slow_store_slows_the_submitter_instead_of_queueing_rows(layout, step_row):
    """At most one block waits for the store besides the buffer: what a crash can lose."""
    store = FlakyStore()
    store.delay = 0.002
    flush_every = 2
    writer = ArchiveWriter(store, layout, flush_every=flush_every)
    archive = writer.archive()
    unwritten = []
    for step in range(30):
        writer.append_step(step_row(step), step=step, epoch=0)
        unwritten.append(step + 1 - archive.n_steps)
    writer.close()
    assert max(unwritten) <= 2 * flush_every
    assert open_archive(store).n_steps == 30


# ---------------------------------------------------------------------- host thread


class Failing:
    """A host spectra function that raises while ``on`` is set."""

    on = False

    def __init__(self, function):
        self.function = function

    def __call__(self, *args, **kwargs):
        if Failing.on:
            raise np.linalg.LinAlgError("injected failure")
        return self.function(*args, **kwargs)


def _train(model, mon, steps):
    for _ in range(steps):
        mon.label(torch.tensor([0, 1, 0, 1]))
        model(torch.randn(4, 4)).sum().backward()


def test_a_host_failure_records_the_step_as_nan(monkeypatch):
    """The spectra of step 1 fail on the host thread: its row holds NaN (its counts kept), one
    warning says so, and neither ``end_epoch()`` nor ``close()`` raises."""
    for name in ("exact_spectra", "sketched_spectra"):
        monkeypatch.setattr(pipeline, name, Failing(getattr(pipeline, name)))
    monkeypatch.setattr(Failing, "on", False)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    with pytest.warns(StreamspecWarning) as record:
        mon = streamspec.watch(model, ["a", "b"], rank=2, live=False)
        for step in range(3):
            Failing.on = step == 1
            _train(model, mon, 1)
            mon.flush()  # the host thread is done with the step
        Failing.on = False
        mon.end_epoch()
        _train(model, mon, 1)
        mon.end_epoch()
        mon.close()
    (message,) = messages(record)
    assert "step 1" in message and "injected failure" in message
    ds = mon.to_xarray()
    np.testing.assert_array_equal(ds.step, np.arange(4))
    np.testing.assert_array_equal(ds["count"], np.full((4, 2), 2))
    assert np.isnan(ds.sigma[1]).all()
    assert np.isfinite(ds.sigma[[0, 2, 3]].sel(kind="activation")).all()
    assert np.isfinite(ds.welch_t[0].sel(kind="activation")).all()  # from the 2 other steps


def test_close_reports_the_host_error_and_the_lost_rows(monkeypatch):
    """A host error (the cause) is raised by ``close()``; the rows the store lost are still
    reported, as a warning, instead of a writer error that hid the host error."""

    def broken_append_epoch(self, row, *, epoch):
        raise KeyError("injected host failure")

    store = FlakyStore()
    model = nn.Linear(4, 2)
    with pytest.warns(StreamspecWarning) as record:
        mon = streamspec.watch(model, ["a", "b"], rank=2, live=False, store=store)
        store.failures = -1
        _train(model, mon, 2)
        monkeypatch.setattr(ArchiveWriter, "append_epoch", broken_append_epoch)
        with pytest.raises(RuntimeError, match="host pipeline failed.*injected host failure"):
            mon.close()  # closes the epoch: the host thread fails on it
    assert "2 step rows (steps 0..1) were not written" in messages(record)[-1]


# -- from a review of the retry path: stale writes, split commits, repeated resumes -------------

_LAYOUT = streamspec.layout.RunLayout(
    layers=("a",), groups=("x", "y"), rank=2, normalize="mean", every=1, model="M"
)


def _row(step: int) -> dict[str, np.ndarray]:
    return {
        "sigma": np.full(_LAYOUT.step_shape, step, np.float32),
        "count": np.full(2, step, np.int64),
    }


def test_a_failed_attempt_leaves_no_write_in_flight(monkeypatch) -> None:
    """zarr writes a call's chunks concurrently; when one failed, a slow sibling landed after the
    retry and the next block had committed, wiping committed rows. One chunk per call now."""
    import time

    monkeypatch.setattr(writer_module, "_RETRY_DELAYS", (0.0, 0.0))

    class Store(zarr.storage.MemoryStore):
        fail_once = slow = False

        async def set(self, key, value, byte_range=None):  # type: ignore[no-untyped-def]
            if self.fail_once and key == "step/c/0":
                self.fail_once = False
                raise OSError("injected transient failure")
            if self.slow and key == "step/c/1":
                self.slow = False
                await asyncio.sleep(0.3)
            await super().set(key, value, byte_range)

    store = Store()
    w = ArchiveWriter(store, _LAYOUT, flush_every=4, chunk_steps=4)
    for s in range(2):
        w.append_step(_row(s), step=s, epoch=0)
    w.flush()
    store.fail_once = store.slow = True
    for s in range(2, 6):  # rows 2..5 span chunks 0 and 1
        w.append_step(_row(s), step=s, epoch=0)
    w.flush()
    for s in range(6, 8):
        w.append_step(_row(s), step=s, epoch=0)
    w.flush()
    time.sleep(0.5)
    w.close()
    archive = open_archive(store)
    ds = archive.to_xarray()
    assert w.lost_rows == {"step": 0, "epoch": 0}
    assert ds["step"].values.tolist() == list(range(8))
    assert ds["sigma"].values[:, 0, 0, 0, 0].tolist() == [float(s) for s in range(8)]
    archive.check()


def test_a_commit_that_lands_but_reports_failure_is_kept(tmp_path, monkeypatch) -> None:
    """A commit whose write lands and then raises (a timeout after the PUT) used to be counted
    lost and its arrays cut below the counter on disk: check() called the archive damaged and
    resume refused it. The writer now reads the stored counter back and keeps the block."""
    monkeypatch.setattr(writer_module, "_RETRY_DELAYS", (0.0, 0.0))

    class LandsThenFails(zarr.storage.LocalStore):
        failures = 0

        async def set(self, key, value):  # type: ignore[no-untyped-def]
            await super().set(key, value)
            if self.failures and key == "zarr.json":  # the root group's commit
                self.failures -= 1
                raise TimeoutError("response lost after the write landed")

    path = tmp_path / "run.zarr"
    path.mkdir()
    store = LandsThenFails(str(path))
    w = ArchiveWriter(store, _LAYOUT, flush_every=2)
    for s in range(2):
        w.append_step(_row(s), step=s, epoch=0)
    w.flush()
    store.failures = 3
    for s in range(2, 4):
        w.append_step(_row(s), step=s, epoch=0)
    w.flush()
    assert w.lost_rows == {"step": 0, "epoch": 0}
    archive = open_archive(path)  # as a killed process would leave it
    assert archive.n_steps == 4 and zarr.open_array(str(path / "sigma")).shape[0] == 4
    archive.check()
    w.close()


def test_a_variable_added_on_resume_keeps_its_values_at_the_next_resume(
    tmp_path, monkeypatch
) -> None:
    """The "filling" mark of a variable a newer schema added was never cleared, so the next
    resume created the array again and wiped what the previous session wrote."""
    from streamspec.store import schema

    path = tmp_path / "run.zarr"
    with ArchiveWriter(path, _LAYOUT, chunk_steps=2) as w:  # an archive without the variable
        for s in range(3):
            w.append_step(_row(s), step=s, epoch=0)
    bound = schema.RowVariable(
        "sigma_bound", ("step", "layer", "kind", "group", "rank"), "float32", required=False
    )
    monkeypatch.setattr(schema, "ROW_VARIABLES", (*schema.ROW_VARIABLES, bound))
    with ArchiveWriter(path, _LAYOUT, resume=True, chunk_steps=2) as w:
        for s in range(3, 6):
            values = np.full(_LAYOUT.step_shape, 7.0, np.float32)
            w.append_step({**_row(s), "sigma_bound": values}, step=s, epoch=0)
    with ArchiveWriter(path, _LAYOUT, resume=True, chunk_steps=2) as w:
        w.append_step(_row(6), step=6, epoch=0)
    ds = open_archive(path).to_xarray()
    assert np.isnan(ds["sigma_bound"].values[:3]).all()
    assert (ds["sigma_bound"].values[3:6] == 7.0).all()


def _breakable(tmp_path, prefix: str) -> tuple[Path, BreakableStore]:
    """A run directory and a :class:`BreakableStore` over it, breaking writes under ``prefix``."""
    path = tmp_path / "run.zarr"
    path.mkdir()
    store = BreakableStore(str(path))
    store.prefix = prefix
    return path, store


def test_steps_of_a_lost_last_block_are_not_reused_by_a_resume(tmp_path) -> None:
    """A closed run whose last block was lost left its step numbers free: a resume numbered its
    steps from the last committed one, reusing the lost steps' numbers."""
    path, store = _breakable(tmp_path, "sigma/")
    w = ArchiveWriter(store, _LAYOUT, flush_every=2, chunk_steps=2)
    for s in range(4):
        w.append_step(_row(s), step=s, epoch=0)
    w.flush()
    store.broken = True
    for s in range(4, 6):
        w.append_step(_row(s), step=s, epoch=0)
    w.flush()
    store.broken = False
    with pytest.warns(StreamspecWarning, match="not written"):
        w.close(next_step=6)
    assert w.lost_rows["step"] == 2
    with ArchiveWriter(path, _LAYOUT, resume=True) as resumed:
        assert resumed.start_step == 6


def _epoch_row() -> dict[str, np.ndarray]:
    return {
        "sigma_epoch": np.zeros(_LAYOUT.step_shape, np.float32),
        "welch_t": np.zeros(_LAYOUT.pair_shape),
        "welch_p": np.zeros(_LAYOUT.pair_shape),
    }


@pytest.mark.parametrize("ending", ["close(next_step)", "close()", "kill", "kill at once"])
def test_the_epoch_of_a_lost_epoch_row_is_not_reused_by_a_resume(tmp_path, ending) -> None:
    """The row of epoch 1 is lost. A resume numbered its epochs from the last committed row:
    epoch 1 again, a label the archived steps of the lost epoch already carry (and after a
    kill with epoch 2's steps committed, a start the writer itself refused: epochs go back).
    Killed at once, before any step of epoch 2, the archive's rows alone cannot say that epoch
    1 ended: the writer records the next epoch when it gives the row up."""
    path, store = _breakable(tmp_path, "sigma_epoch/")
    w = ArchiveWriter(store, _LAYOUT, flush_every=2, chunk_steps=2)
    for s in range(4):
        w.append_step(_row(s), step=s, epoch=s // 2)
        if s == 1:
            w.append_epoch(_epoch_row(), epoch=0)
    w.flush()
    store.broken = True
    w.append_epoch(_epoch_row(), epoch=1)
    w.flush()
    store.broken = False
    assert w.lost_rows == {"step": 0, "epoch": 1}
    if ending == "kill":  # epoch 2's steps committed, then the process dies (w never closed)
        for s in range(4, 6):
            w.append_step(_row(s), step=s, epoch=2)
        w.flush()
    elif ending.startswith("close"):
        with pytest.warns(StreamspecWarning, match="not written"):
            w.close(next_step=4) if ending == "close(next_step)" else w.close()
    n_steps = open_archive(path).n_steps
    with ArchiveWriter(path, _LAYOUT, resume=True) as resumed:
        assert resumed.start_epoch == 2
        unfinished = resumed.unfinished_epoch()  # epoch 1 is over: its steps are not epoch 2's
        assert unfinished.step.tolist() == ([4, 5] if ending == "kill" else [])
        resumed.append_step(_row(n_steps), step=n_steps, epoch=2)
        resumed.append_epoch(_epoch_row(), epoch=2)
    ds = open_archive(path).to_xarray()
    assert ds["epoch"].values.tolist() == [0, 2]
    assert ds["step_epoch"].values.tolist() == [0, 0, 1, 1] + [2] * (n_steps - 3)


def test_a_base_exception_in_a_write_does_not_wedge_the_writer(monkeypatch) -> None:
    """A BaseException (asyncio.CancelledError, a patched codec's SystemExit) escaping a block
    write used to leave the blocks merged after it unwritten, uncounted and holding the
    backpressure: the next full block waited for ever. They are now counted lost."""
    import threading

    class Boom(BaseException):
        pass

    w = ArchiveWriter(None, _LAYOUT, flush_every=4)
    writing, gate, calls = threading.Event(), threading.Event(), [0]
    real = ArchiveWriter._write_block

    def write_block(self, row_dim, rows):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 1:
            writing.set()
            gate.wait(5)  # block A: a slow store, while B and an epoch row queue (one drain)
        if calls[0] == 2:
            raise Boom("escapes except Exception")  # block B
        return real(self, row_dim, rows)

    monkeypatch.setattr(ArchiveWriter, "_write_block", write_block)
    epoch_row = _epoch_row()
    for s in range(2):
        w.append_step(_row(s), step=s, epoch=0)
    w.flush(wait=False)
    # B must queue behind A, not beside it: handed over before the thread took A (a loaded
    # machine, the thread slow to start), it was merged into A's write and written with it.
    assert writing.wait(5)
    w.append_step(_row(2), step=2, epoch=0)
    w.append_epoch(epoch_row, epoch=0)
    gate.set()
    with contextlib.suppress(BaseException):
        w.flush()
    assert w._unwritten == 0
    assert w.lost_rows == {"step": 1, "epoch": 1}
    done = threading.Event()

    def more() -> None:
        for s in range(3, 8):
            w.append_step(_row(s), step=s, epoch=1)
        done.set()

    threading.Thread(target=more, daemon=True).start()
    assert done.wait(5)
    with pytest.warns(StreamspecWarning, match="not written"):
        w.close()
