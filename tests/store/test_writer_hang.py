"""A store that hangs (a write that never returns) never stops training for long.

Once a store call of the writer has run ``_WRITE_TIMEOUT`` seconds, the blocks that would wait
for it are dropped (counted lost, warned once, summed up at ``close()``) instead of blocking the
submitter; if the store answers again, later blocks are written where the committed rows end;
``close()`` gives up on a hung call after the timeout (a block's or one of its own last ones), and
the call that lands later is the writer's last (the archive is then as a run killed during that
call leaves it).

Every blocking call runs in a daemon thread joined with a deadline, so that a hang fails the
test instead of freezing the suite; the store is always released at the end.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import streamspec
from streamspec import monitor as monitor_module
from streamspec.errors import StreamspecError, StreamspecWarning
from streamspec.store import ArchiveWriter, open_archive
from streamspec.store import writer as writer_module

TIMEOUT = 0.5  # the write timeout in these tests (s); a normal write takes milliseconds
SLACK = 1.5  # what a loaded test machine may add to it (s)
DEADLINE = 5.0  # what a test waits for a call before calling it stuck (s)


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch):
    """A short write timeout and retries without pauses (``raising=False``: these tests also
    run, and fail, on a writer without a timeout)."""
    monkeypatch.setattr(writer_module, "_WRITE_TIMEOUT", TIMEOUT, raising=False)
    monkeypatch.setattr(writer_module, "_RETRY_DELAYS", (0.0, 0.0), raising=False)


class HangingStore(zarr.storage.MemoryStore):
    """An in-memory store whose writes of keys starting with ``prefix`` hang while ``hanging``
    is set (after ``skip`` such writes), until the ``release`` event is set (a stale NFS mount, a
    dead connection); while ``hanging``, writes of keys starting with ``fail`` (if set) raise.

    The hung write awaits, so zarr's event loop and the other keys keep working; ``keys`` lists
    every key written, ``hung`` is set once a write hangs. The events, the key list and ``skip``
    live on the class (zarr may copy a store, e.g. read-only), so each test makes its own subclass
    with the ``hanging_store`` fixture.
    """

    prefix = ""
    fail = ""
    skip = 0
    hanging = False
    hung: threading.Event
    release: threading.Event
    keys: list[str]

    async def set(self, key, value, byte_range=None):
        cls = type(self)
        if self.hanging and self.fail and key.startswith(self.fail):
            raise OSError(f"injected failure writing {key}")
        if self.hanging and key.startswith(self.prefix) and cls.skip:
            cls.skip -= 1
        elif self.hanging and key.startswith(self.prefix):
            self.hung.set()
            while not self.release.is_set():
                await asyncio.sleep(0.005)
        await super().set(key, value, byte_range)
        self.keys.append(key)


@pytest.fixture
def hanging_store() -> Iterator[Callable[[str], HangingStore]]:
    """Makes stores whose writes of keys starting with a prefix can hang; every one is hanging_store
    at the end of the test, whatever happens."""
    stores: list[HangingStore] = []

    def make(prefix: str) -> HangingStore:
        cls = type(
            "Store",
            (HangingStore,),
            {"prefix": prefix, "hung": threading.Event(), "release": threading.Event(), "keys": []},
        )
        stores.append(cls())
        return stores[-1]

    yield make
    for store in stores:
        store.release.set()


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[float]]:
    """Run ``call`` in a daemon thread; the list gets the seconds it took once it returns."""
    took: list[float] = []

    def run() -> None:
        start = time.monotonic()
        call()
        took.append(time.monotonic() - start)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, took


def write(writer: ArchiveWriter, step_row, steps) -> None:
    for step in steps:
        writer.append_step(step_row(step), step=step, epoch=0)


def messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, StreamspecWarning)]


def recover(store: HangingStore, writer: ArchiveWriter) -> None:
    """Release the hung write and wait until the writer is done with its block: the store
    answers again. Waiting for the commit alone is not enough: the writer learns the write
    returned only after it lands, and a block handed over in between is still dropped (a loaded
    machine can make that window long)."""
    thread = writer._thread  # the background thread, writing the hung block
    assert thread is not None
    store.hanging = False
    store.release.set()
    thread.join(DEADLINE)  # its blocks written (the later ones were dropped), it ends
    assert not thread.is_alive(), "the hung block was never finished"
    assert writer.archive().n_steps == 4, "the hung block was never committed"


def hang_on_steps_2_3(store: HangingStore, writer: ArchiveWriter, step_row) -> None:
    """Steps 0..1 committed; the block of steps 2..3 hangs in its write."""
    write(writer, step_row, range(2))
    writer.flush()
    store.hanging = True
    write(writer, step_row, range(2, 4))  # handed over: the thread starts writing it
    assert store.hung.wait(DEADLINE)


def test_appending_waits_at_most_the_timeout_for_a_hung_store(layout, step_row, hanging_store):
    """Once a block's worth of rows waits behind the hung write, appending used to block for
    ever (and with it training). It waits the timeout once, then drops blocks instead."""
    store = hanging_store("sigma/c/")
    writer = ArchiveWriter(store, layout, flush_every=2)
    with pytest.warns(StreamspecWarning) as record:
        hang_on_steps_2_3(store, writer, step_row)
        first, first_took = in_thread(lambda: write(writer, step_row, range(4, 6)))
        first.join(DEADLINE)
        assert first_took and first_took[0] < TIMEOUT + SLACK, "append blocked on a hung store"
        more, more_took = in_thread(lambda: write(writer, step_row, range(6, 40)))
        more.join(DEADLINE)
        assert more_took and more_took[0] < SLACK, "later appends waited again"
    (warning,) = messages(record)  # once, naming the store, the hung write and the dropped rows
    assert str(store) in warning and "steps 2..3" in warning and "steps 4..5" in warning
    assert "has not returned" in warning
    assert writer.lost_rows == {"step": 36, "epoch": 0}  # steps 4..39: all but the hung block


def test_rows_dropped_while_hung_are_reported_and_the_archive_checks_clean(
    layout, step_row, epoch_row, hanging_store
):
    store = hanging_store("sigma/c/")
    writer = ArchiveWriter(store, layout, flush_every=2)
    with pytest.warns(StreamspecWarning) as record:
        hang_on_steps_2_3(store, writer, step_row)
        appending, took = in_thread(lambda: write(writer, step_row, range(4, 10)))
        appending.join(DEADLINE)
        assert took, "append blocked on a hung store"
        assert writer.lost_rows == {"step": 6, "epoch": 0}
        recover(store, writer)  # the hung write lands: its block is written after all
        writer.append_epoch(epoch_row(0), epoch=0)
        closing, _ = in_thread(writer.close)
        closing.join(DEADLINE)
        assert not closing.is_alive()
    summary = messages(record)[-1]
    assert "6 step rows (steps 4..9) were not written" in summary and str(store) in summary
    assert "hung" in summary
    archive = open_archive(store)
    archive.check()  # the counters claim no dropped row; every committed chunk is there
    ds = archive.to_xarray()
    np.testing.assert_array_equal(ds.step, [0, 1, 2, 3])
    np.testing.assert_array_equal(ds.sigma[3], step_row(3)["sigma"])
    np.testing.assert_array_equal(ds.welch_p[0], epoch_row(0)["welch_p"])


def test_writing_resumes_with_later_blocks_once_the_store_answers(layout, step_row, hanging_store):
    """The hung write finishes first, then the next blocks are written after the committed rows:
    nothing lands on a row committed later, and the commit counters count every row there."""
    store = hanging_store("sigma/c/")
    writer = ArchiveWriter(store, layout, flush_every=2)
    with pytest.warns(StreamspecWarning) as record:
        hang_on_steps_2_3(store, writer, step_row)
        appending, took = in_thread(lambda: write(writer, step_row, range(4, 8)))
        appending.join(DEADLINE)
        assert took, "append blocked on a hung store"
        recover(store, writer)
        later, later_took = in_thread(
            lambda: (write(writer, step_row, range(8, 14)), writer.flush())
        )
        later.join(DEADLINE)
        assert later_took, "the writer never recovered"
        assert writer.archive().n_steps == 10  # committed while the writer is open
        writer.close()
    assert "4 step rows (steps 4..7) were not written" in messages(record)[-1]
    archive = open_archive(store)
    archive.check()
    ds = archive.to_xarray()
    steps = [0, 1, 2, 3, *range(8, 14)]
    np.testing.assert_array_equal(ds.step, steps)
    for i, step in enumerate(steps):
        np.testing.assert_array_equal(ds.sigma[i], step_row(step)["sigma"])


@pytest.mark.parametrize(
    "prefix", ["sigma/zarr.json", "sigma/c/", "zarr.json"], ids=["grow", "data", "commit"]
)
def test_close_gives_up_on_a_hung_write_which_is_then_the_last(
    layout, step_row, hanging_store, prefix
):
    """close() used to wait for ever on a hung write. It now waits the timeout, reports the rows
    as lost and returns; when the hung call lands later, the writer makes no other store call,
    so the archive is as a run killed during that call leaves it: it checks clean, and its
    counters count only rows that are there (the hung commit, landing, counts its own rows)."""
    store = hanging_store(prefix)
    writer = ArchiveWriter(store, layout, flush_every=2)
    with pytest.warns(StreamspecWarning) as record:
        hang_on_steps_2_3(store, writer, step_row)
        writer.append_step(step_row(4), step=4, epoch=0)  # buffered: close() hands it over
        thread = getattr(writer, "_thread", None)  # the background thread
        closing, took = in_thread(writer.close)
        closing.join(DEADLINE)
        assert took and took[0] < TIMEOUT + SLACK, "close() waited for the hung store"
    summary = messages(record)[-1]
    assert "3 step rows (steps 2..4) were not written" in summary and str(store) in summary
    assert "close() stopped waiting" in summary
    assert "may yet land if the store answers" in summary  # the hung block itself
    assert writer.lost_rows == {"step": 3, "epoch": 0}
    written = len(store.keys)
    store.release.set()  # the hung call lands now
    assert thread is not None
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert store.keys[written:] == [store.keys[-1]] and store.keys[-1].startswith(prefix)
    archive = open_archive(store)
    archive.check()
    ds = archive.to_xarray()
    steps = [0, 1, 2, 3] if prefix == "zarr.json" else [0, 1]
    np.testing.assert_array_equal(ds.step, steps)
    for i, step in enumerate(steps):
        np.testing.assert_array_equal(ds.sigma[i], step_row(step)["sigma"])
    with ArchiveWriter(store, layout, resume=True) as resumed:  # cuts off the rest
        assert resumed.start_step == len(steps)


def test_close_gives_up_on_a_store_that_hangs_after_the_last_block(layout, step_row, hanging_store):
    """Every row is committed, then the store hangs as close() records the next indices (its
    last calls: next indices, consolidated metadata): it returns, saying so, and writes nothing
    after the hung call."""
    store = hanging_store("zarr.json")
    writer = ArchiveWriter(store, layout, flush_every=2)
    write(writer, step_row, range(4))
    writer.flush()
    store.hanging = True
    with pytest.warns(StreamspecWarning) as record:
        closing, took = in_thread(lambda: writer.close(next_step=4))
        closing.join(DEADLINE)
        assert took and took[0] < TIMEOUT + SLACK, "close() waited for the hung store"
        (warning,) = messages(record)
        assert "close() stopped waiting" in warning and str(store) in warning
        assert writer.lost_rows == {"step": 0, "epoch": 0}
        written = len(store.keys)
        thread = getattr(writer, "_thread", None)
        store.release.set()  # (within pytest.warns: the thread puts warning filters back)
        assert thread is not None
        thread.join(DEADLINE)
        assert not thread.is_alive()
    assert store.keys[written:] == ["zarr.json"]  # the hung call lands; nothing follows it
    archive = open_archive(store)
    archive.check()
    assert archive.n_steps == 4


def test_a_failed_block_whose_cut_back_hangs_is_counted_once(layout, step_row, hanging_store):
    """Steps 2..3 fail every attempt and are counted lost; cutting their arrays back then hangs.
    close() gives up on it, counting the blocks it did not finish, but these rows only once."""
    store = hanging_store("step/zarr.json")
    store.fail = "sigma/c/"
    type(store).skip = 3  # each attempt grows the arrays; the cut-back after the third hangs
    writer = ArchiveWriter(store, layout, flush_every=2)
    with pytest.warns(StreamspecWarning) as record:
        hang_on_steps_2_3(store, writer, step_row)
        closing, took = in_thread(writer.close)
        closing.join(DEADLINE)
        assert took and took[0] < TIMEOUT + SLACK, "close() waited for the hung store"
    assert writer.lost_rows == {"step": 2, "epoch": 0}
    assert "2 step rows (steps 2..3) were not written" in messages(record)[-1]
    store.release.set()
    open_archive(store).check()


def test_a_watched_run_trains_on_while_its_store_hangs(monkeypatch, hanging_store):
    """Training waits on the host thread's full queue, the host thread on the writer: with the
    store hung, training used to stop. It now goes on, and close() returns."""
    monkeypatch.setattr(monitor_module, "FLUSH_EVERY", 4)
    monkeypatch.setattr(monitor_module, "QUEUED_STEPS", 4)
    store = hanging_store("sigma/c/")
    model = nn.Linear(4, 2)
    with pytest.warns(StreamspecWarning) as record:
        mon = streamspec.watch(model, ["a", "b"], rank=2, live=False, store=store)
        store.hanging = True

        def train() -> None:
            for _ in range(40):
                mon.label(torch.tensor([0, 1, 0, 1]))
                model(torch.randn(4, 4)).sum().backward()
            mon.close()

        training, took = in_thread(train)
        training.join(DEADLINE)
        assert took and took[0] < 2 * TIMEOUT + 2 * SLACK, "training stopped on a hung store"
    assert "were not written" in messages(record)[-1]
    lost = mon._writer.lost_rows["step"]
    assert 0 < lost <= 40


@pytest.mark.parametrize("prefix", ["sigma/c/", "zarr.json"], ids=["data", "commit"])
def test_a_new_writer_of_the_store_waits_for_the_call_close_gave_up_on(
    layout, step_row, hanging_store, prefix, monkeypatch
):
    """close() gave up on a hung call, which may still land. A new writer of the store (a resume
    in the same process, the store answering again) used to write at once, and the late call then
    landed over its rows: stale rows over the resumed ones, or the commit counters set back (the
    resumed rows cut off by the next resume), with check() seeing nothing wrong. A new writer now
    waits for that call (at most the timeout), and refuses the store while it hangs."""
    store = hanging_store(prefix)
    writer = ArchiveWriter(store, layout, flush_every=2)
    with pytest.warns(StreamspecWarning):
        hang_on_steps_2_3(store, writer, step_row)
        closing, _ = in_thread(writer.close)
        closing.join(DEADLINE)
        assert not closing.is_alive()
    store.hanging = False  # new calls are answered; the one close() gave up on is still hung
    opening, took = in_thread(
        lambda: pytest.raises(StreamspecError, ArchiveWriter, store, layout, resume=True)
    )
    opening.join(DEADLINE)
    assert took and took[0] < TIMEOUT + SLACK, "the new writer did not refuse the store"
    # The next one waits for it up to DEADLINE, not TIMEOUT: the call lands TIMEOUT / 2 from now,
    # but a loaded machine can take longer than the rest of TIMEOUT for its thread to end.
    monkeypatch.setattr(writer_module, "_WRITE_TIMEOUT", DEADLINE)
    threading.Timer(TIMEOUT / 2, store.release.set).start()  # lands while the next one waits

    def new_row(step: int) -> dict[str, np.ndarray]:
        return {"sigma": step_row(step)["sigma"] + 1000, "count": step_row(step)["count"]}

    with ArchiveWriter(store, layout, resume=True) as resumed:
        start = resumed.start_step
        for step in range(start, start + 4):
            resumed.append_step(new_row(step), step=step, epoch=0)
    archive = open_archive(store)
    archive.check()
    ds = archive.to_xarray()
    np.testing.assert_array_equal(ds.step, range(start + 4))
    for step in range(start + 4):
        want = step_row(step) if step < start else new_row(step)
        np.testing.assert_array_equal(ds.sigma[step], want["sigma"], err_msg=f"step {step}")


def test_a_store_whose_every_call_times_out_holds_training_up_once(layout, step_row):
    """A soft-mounted stale NFS share: each write hangs a little longer than the timeout, then
    fails. Appending used to wait the timeout again for each new store call (each retry, each
    block): training ran at a fraction of its speed for as long as the store hung. It now waits
    once; the hang ends when a block is written again."""

    class SlowFailing(zarr.storage.MemoryStore):
        broken = False

        async def set(self, key, value, byte_range=None):
            if type(self).broken and key.startswith("sigma/c/"):
                await asyncio.sleep(TIMEOUT + 0.2)
                raise OSError(f"injected EIO writing {key} after the mount's timeout")
            await super().set(key, value, byte_range)

    writer = ArchiveWriter(SlowFailing(), layout, flush_every=2)
    SlowFailing.broken = True
    steps, step_time = 80, 0.05
    with pytest.warns(StreamspecWarning):
        start = time.monotonic()
        for step in range(steps):
            time.sleep(step_time)  # the training step
            writer.append_step(step_row(step), step=step, epoch=0)
        took = time.monotonic() - start
        SlowFailing.broken = False  # the store answers again: blocks are written again
        deadline = time.monotonic() + DEADLINE
        step = steps
        while not writer.archive().n_steps:
            assert time.monotonic() < deadline, "the writer never recovered"
            time.sleep(step_time)
            writer.append_step(step_row(step), step=step, epoch=0)
            step += 1
        writer.close()
    assert took < steps * step_time + TIMEOUT + SLACK, "training was held up again and again"
    assert writer.lost_rows["step"] > 0


def test_a_consolidation_close_gave_up_on_leaves_the_warning_filters_alone(
    layout, step_row, hanging_store
):
    """close() gives up on its hung consolidation. That call used to put back, whenever it
    returned, the process-wide warning filters (and showwarning) of when it began: the filters
    set meanwhile were undone. It now removes only its own filters."""
    store = hanging_store("zarr.json")
    writer = ArchiveWriter(store, layout, flush_every=2)
    write(writer, step_row, range(4))
    writer.flush()
    store.hanging = True  # no next indices to record: the consolidation's write hangs
    with warnings.catch_warnings():
        with pytest.warns(StreamspecWarning, match=r"close\(\) stopped waiting"):
            closing, _ = in_thread(writer.close)
            closing.join(DEADLINE)
        warnings.filterwarnings("error", message="the process's own filter")
        thread = writer._thread
        store.release.set()
        assert thread is not None
        thread.join(DEADLINE)
        patterns = [f[1].pattern for f in warnings.filters if f[1] is not None]
        assert "the process's own filter" in patterns
        assert "Consolidated metadata" not in patterns
