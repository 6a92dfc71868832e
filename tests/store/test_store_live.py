"""A run is followed while it is written: readers see committed rows only; training never waits."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr

from streamspec.store import ArchiveWriter

WORKER = Path(__file__).with_name("_worker.py")
STEPS_PER_EPOCH = 40  # as in _worker.py


def live_step(layout, step):
    return {
        "sigma": np.full(layout.step_shape, step + 0.25, dtype=np.float32),
        "count": np.full(len(layout.groups), step),
    }


def live_epoch(layout, epoch):
    return {
        "sigma_epoch": np.full(layout.step_shape, epoch, dtype=np.float32),
        "welch_t": np.full(layout.pair_shape, epoch, dtype=np.float64),
        "welch_p": np.full(layout.pair_shape, epoch, dtype=np.float64),
    }


def test_reader_in_another_process_sees_only_complete_rows(tmp_path, layout):
    path = tmp_path / "live.zarr"
    writer = ArchiveWriter(path, layout, chunk_steps=64, flush_every=3)
    reader = subprocess.Popen(
        [sys.executable, "-W", "error", str(WORKER), "follow", str(path), "2.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    step, deadline = 0, time.monotonic() + 60
    try:
        while reader.poll() is None and time.monotonic() < deadline:
            epoch = step // STEPS_PER_EPOCH
            writer.append_step(live_step(layout, step), step=step, epoch=epoch)
            if step % STEPS_PER_EPOCH == STEPS_PER_EPOCH - 1:
                writer.append_epoch(live_epoch(layout, epoch), epoch=epoch)
            step += 1
            time.sleep(0.001)
    finally:
        writer.close()
        if reader.poll() is None:
            reader.kill()
        out, err = reader.communicate(timeout=30)
    assert reader.returncode == 0, err
    report = json.loads(out)
    assert report["problems"] == []
    assert report["reads"] >= 10, report
    assert report["distinct_lengths"] >= 5, report  # it followed a growing archive


def test_archive_follows_the_writer_in_process(layout):
    writer = ArchiveWriter(None, layout, flush_every=4)
    archive = writer.archive()
    for step in range(3):
        writer.append_step(live_step(layout, step), step=step, epoch=0)
    assert archive.n_steps == 0 and archive.to_xarray().sizes["step"] == 0  # still buffered
    writer.flush()
    assert archive.n_steps == 3
    writer.append_epoch(live_epoch(layout, 0), epoch=0)
    writer.flush()
    ds = archive.to_xarray()
    assert (ds.sizes["step"], ds.sizes["epoch"]) == (3, 1)
    writer.close()


class SlowStore(zarr.storage.MemoryStore):
    """Every write takes ``delay_s`` once set (a slow network file system)."""

    delay_s = 0.0

    async def set(self, key, value, byte_range=None):
        await asyncio.sleep(self.delay_s)
        await super().set(key, value, byte_range)


def test_append_step_does_not_wait_for_the_store(layout):
    store = SlowStore()
    writer = ArchiveWriter(store, layout, flush_every=4)
    store.delay_s = 0.05  # a flush writes >= 6 keys in sequence: >= 0.3 s
    started = time.perf_counter()
    # One flush handed over, the next block buffered: a second hand-off would wait for the
    # first block (the writer holds one block besides its buffer; test_writer_failures.py).
    for step in range(7):
        writer.append_step(live_step(layout, step), step=step, epoch=0)
    appending = time.perf_counter() - started
    started = time.perf_counter()
    writer.close()
    closing = time.perf_counter() - started
    assert closing > 0.3
    assert writer.archive().n_steps == 7
    assert appending < 0.1, f"append_step took {appending:.3f} s for 7 rows"
