"""Subprocess side of the store tests: run as a script (the crash tests import ``check``).

``python _worker.py follow PATH SECONDS`` re-opens the archive at PATH as fast as it can for
SECONDS and checks every read holds only complete rows of what ``test_store_live`` writes:
``step == row index``, ``count == step``, ``floor(sigma) == step``, ``step_epoch ==
step // STEPS_PER_EPOCH``, and epoch rows equal to their epoch number. Prints a JSON report.

``python _worker.py write PATH`` writes such rows to PATH (resuming it) until killed, with a
flush every 2 rows, and prints ``committed N`` whenever ``flush()`` has made N steps durable.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from streamspec.layout import RunLayout
from streamspec.store import ArchiveWriter, open_archive

STEPS_PER_EPOCH = 40
LAYOUT = RunLayout(layers=("encoder.fc1", "encoder.fc2"), groups=("cats", "dogs"), rank=4)


def check(ds) -> list[str]:
    """Problems in one read (empty if every row is complete and consistent)."""
    problems = []
    n = ds.sizes["step"]
    step = ds.step.values
    if not np.array_equal(step, np.arange(n)):
        problems.append(f"step != 0..{n - 1}")
    sigma = ds.sigma.values
    if np.isnan(sigma).any():
        rows = np.unique(np.nonzero(np.isnan(sigma))[0]).tolist()
        problems.append(f"NaN in sigma rows {rows[:5]} of {n}")
    elif not np.array_equal(
        np.floor(sigma), np.broadcast_to(step[:, None, None, None, None], sigma.shape)
    ):
        problems.append("sigma rows do not match their step")
    if not np.array_equal(ds["count"].values, np.broadcast_to(step[:, None], ds["count"].shape)):
        problems.append("count rows do not match their step")
    if not np.array_equal(ds.step_epoch.values, step // STEPS_PER_EPOCH):
        problems.append("step_epoch rows do not match their step")
    n_epochs = ds.sizes["epoch"]
    epoch = ds.epoch.values
    if not np.array_equal(epoch, np.arange(n_epochs)):
        problems.append(f"epoch != 0..{n_epochs - 1}")
    for name in ("sigma_epoch", "welch_t", "welch_p"):
        values = ds[name].values
        expected = np.broadcast_to(epoch[:, None, None, None, None], values.shape)
        if not np.array_equal(values, expected):
            problems.append(f"{name} rows do not match their epoch")
    return problems


def follow(path: str, seconds: float) -> dict:
    reads, lengths, problems = 0, set(), []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        archive = open_archive(path)  # re-opened on every read, as a separate viewer would
        ds = archive.to_xarray().load()
        reads += 1
        lengths.add((ds.sizes["step"], ds.sizes["epoch"]))
        problems += [f"read {reads}: {p}" for p in check(ds)]
    return {"reads": reads, "distinct_lengths": len(lengths), "problems": problems[:20]}


def write(path: str) -> None:
    writer = ArchiveWriter(path, LAYOUT, resume=True, chunk_steps=16, flush_every=2)
    step = writer.start_step
    # A crash can lose the epoch row of an epoch whose steps were all committed: write it first.
    for epoch in range(writer.start_epoch, step // STEPS_PER_EPOCH):
        writer.append_epoch(epoch_row(epoch), epoch=epoch)
    while True:
        epoch = step // STEPS_PER_EPOCH
        writer.append_step(
            {
                "sigma": np.full(LAYOUT.step_shape, step + 0.25, dtype=np.float32),
                "count": np.full(len(LAYOUT.groups), step),
            },
            step=step,
            epoch=epoch,
        )
        if step % STEPS_PER_EPOCH == STEPS_PER_EPOCH - 1:
            writer.append_epoch(epoch_row(epoch), epoch=epoch)
        step += 1
        if step % 7 == 0:
            writer.flush()
            print(f"committed {step}", flush=True)


def epoch_row(epoch: int) -> dict:
    return {
        "sigma_epoch": np.full(LAYOUT.step_shape, epoch, dtype=np.float32),
        "welch_t": np.full(LAYOUT.pair_shape, epoch, dtype=np.float64),
        "welch_p": np.full(LAYOUT.pair_shape, epoch, dtype=np.float64),
    }


if __name__ == "__main__":
    command, path = sys.argv[1], sys.argv[2]
    if command == "follow":
        print(json.dumps(follow(path, float(sys.argv[3]))), flush=True)
    else:
        assert command == "write", command
        write(path)
