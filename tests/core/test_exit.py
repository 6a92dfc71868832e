"""A process that ends with a monitor still open: its recorded steps and partial epoch are written.

Each test runs a short training script in a fresh interpreter (what happens at exit is the point)
and reads the archive it left.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import streamspec

PRELUDE = """
import sys, threading, torch, streamspec
from torch import nn

def train(mon, model, steps, epoch_at=None):
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        x = torch.randn(16, 8, generator=gen)
        mon.label(torch.arange(16) % 2)
        model(x).pow(2).mean().backward()
        opt.step(); opt.zero_grad()
        if step == epoch_at:
            mon.end_epoch()

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))

path = sys.argv[1]
"""


def run_script(body: str, path: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    script = PRELUDE + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_a_script_that_never_closes_its_monitor_keeps_every_step_and_its_partial_epoch(
    tmp_path,
) -> None:
    """50 steps, an end_epoch() after the 5th, no close(): the archive held 5 steps (the rest
    died with the daemon threads at exit); now all 50 and both epochs, with a warning saying so."""
    done = run_script(
        """
        model = mlp()
        mon = streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False)
        train(mon, model, 50, epoch_at=4)
        """,
        tmp_path / "r.zarr",
    )
    ds = streamspec.open(tmp_path / "r.zarr").to_xarray()
    assert ds.sizes["step"] == 50 and ds.sizes["epoch"] == 2
    assert np.isfinite(ds.sigma.values).all() and np.isfinite(ds.sigma_epoch.values).all()
    assert "left open at exit" in done.stderr and "partial epoch 1" in done.stderr


def test_a_forked_child_leaves_its_parents_monitor_alone(tmp_path) -> None:
    """A child forked mid-run (a DataLoader worker) inherits the monitor but not its threads:
    finishing it at the child's exit waited forever for a host thread the child does not have.
    The child exits at once; the parent's archive holds its steps."""
    run_script(
        """
        import multiprocessing
        model = mlp()
        mon = streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False)
        train(mon, model, 3)
        child = multiprocessing.get_context("fork").Process(target=lambda: None)
        child.start(); child.join(30)
        hung = child.is_alive()
        if hung:
            child.kill()
        assert not hung and child.exitcode == 0, child.exitcode
        train(mon, model, 3)
        mon.close()
        """,
        tmp_path / "r.zarr",
        timeout=90,
    )
    assert streamspec.open(tmp_path / "r.zarr").to_xarray().sizes["step"] == 6


def test_training_in_a_thread_that_outlives_the_main_module_is_finished_after_it(tmp_path) -> None:
    """The main module starts a (non-daemon) training thread and ends once the thread made its
    monitor: the monitor is finished once that thread is done, not closed under its training."""
    run_script(
        """
        import time
        made = threading.Event()
        def job():
            model = mlp()
            mon = streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False)
            made.set()
            time.sleep(1.0)  # the main module has ended by now
            train(mon, model, 40)
        threading.Thread(target=job).start()
        made.wait()
        """,
        tmp_path / "r.zarr",
    )
    ds = streamspec.open(tmp_path / "r.zarr").to_xarray()
    assert ds.sizes["step"] == 40 and ds.sizes["epoch"] == 1


def test_a_monitor_collected_just_before_exit_finishes_its_writes(tmp_path) -> None:
    """A monitor dropped with its model and collected right before the process ends: its host
    thread (a daemon) writes the recorded steps, and the exit waits for it."""
    run_script(
        """
        import gc
        def forget():
            model = mlp()
            mon = streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False)
            train(mon, model, 150)
        forget()
        gc.collect()
        """,
        tmp_path / "r.zarr",
    )
    assert streamspec.open(tmp_path / "r.zarr").to_xarray().sizes["step"] == 150


def test_a_monitor_driven_from_an_executor_worker_is_finished_without_waiting_for_it(
    tmp_path,
) -> None:
    """An idle ThreadPoolExecutor worker lives until the executors shut down, after streamspec's
    exit hook: waiting for it hung the process for good."""
    run_script(
        """
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(1)  # never shut down: a module-level pool
        def job():
            model = mlp()
            mon = streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False)
            train(mon, model, 30, epoch_at=4)
        pool.submit(job).result()
        """,
        tmp_path / "r.zarr",
        timeout=60,
    )
    ds = streamspec.open(tmp_path / "r.zarr").to_xarray()
    assert ds.sizes["step"] == 30 and ds.sizes["epoch"] == 2


def test_a_thread_still_training_with_a_monitor_closed_at_exit_goes_on_unbroken(
    tmp_path,
) -> None:
    """A monitor made on the main thread, handed to a thread that prepares its data first: the
    exit closes it (the thread had not labelled a batch yet), and the thread's training goes on,
    unrecorded, instead of dying on "a closed monitor"."""
    done = run_script(
        """
        import time
        model = mlp()
        mon = streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False)
        def job():
            time.sleep(1.0)
            train(mon, model, 20, epoch_at=4)
            with mon.paused():
                pass
            mon.flush()
            mon.close()
            print("training finished", flush=True)
        threading.Thread(target=job).start()
        """,
        tmp_path / "r.zarr",
    )
    assert "training finished" in done.stdout and "Traceback" not in done.stderr
    assert streamspec.open(tmp_path / "r.zarr").to_xarray().sizes["step"] == 0


def test_warnings_as_errors_at_exit_break_nothing(tmp_path) -> None:
    """With warnings turned into errors, the exit's warning raised inside threading's shutdown:
    the second monitor was not finished, and the user's own non-daemon thread was never joined
    (killed mid-work)."""
    done = run_script(
        """
        import os, time, warnings
        warnings.simplefilter("error")
        ended = threading.Event()
        def worker():
            ended.wait(); time.sleep(1.0)
            with open(path + ".worker", "w") as f:
                f.write("done")
        threading.Thread(target=worker).start()
        monitors = []
        for name in ("a.zarr", "b.zarr"):
            model = mlp()
            mon = streamspec.watch(model, ["a", "b"], rank=2, store=f"{path}/{name}", live=False)
            train(mon, model, 30, epoch_at=4)
            monitors.append(mon)
        ended.set()
        """,
        tmp_path,
    )
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path.parent / f"{tmp_path.name}.worker").read_text() == "done"
    for name in ("a.zarr", "b.zarr"):
        ds = streamspec.open(tmp_path / name).to_xarray()
        assert ds.sizes["step"] == 30 and ds.sizes["epoch"] == 2
    assert done.stderr.count("left open at exit") == 2


def test_a_monitor_collected_with_its_host_queue_full_still_writes_everything(tmp_path) -> None:
    """A host thread slower than training has a full queue when the monitor is collected: the
    message to stop was dropped, and with it every step (and the archive's lock, held until the
    process ended). Here the host thread is held on its first step until the queue is full."""
    run_script(
        """
        import gc, time
        from streamspec import pipeline
        hold = threading.Event()
        step_row = pipeline.HostPipeline._step_row
        def held(self, rec):
            hold.wait()
            return step_row(self, rec)
        pipeline.HostPipeline._step_row = held
        def forget():
            model = mlp()
            mon = streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False)
            train(mon, model, 65)  # one on the host thread, 64 queued: full, and no wait yet
            assert mon._pipeline._queue.full()
        forget()
        gc.collect()
        hold.set()
        """,
        tmp_path / "r.zarr",
    )
    assert streamspec.open(tmp_path / "r.zarr").to_xarray().sizes["step"] == 65


def test_a_busy_executor_worker_is_waited_for_until_its_job_is_done(tmp_path) -> None:
    """A job still training on an executor's worker when the main module ends: the executors'
    own exit runs it to the end, so its monitor is finished once the worker is idle (it was
    closed at once, keeping 2 of 200 steps)."""
    run_script(
        """
        import time
        from concurrent.futures import ThreadPoolExecutor
        started = threading.Event()
        def job():
            model = mlp()
            mon = streamspec.watch(model, ["a", "b"], rank=2, store=path, live=False)
            started.set()
            time.sleep(0.5)  # the main module has ended by now
            train(mon, model, 200)
        ThreadPoolExecutor(1).submit(job)
        started.wait()
        """,
        tmp_path / "r.zarr",
        timeout=120,
    )
    assert streamspec.open(tmp_path / "r.zarr").to_xarray().sizes["step"] == 200
