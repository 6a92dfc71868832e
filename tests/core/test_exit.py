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
