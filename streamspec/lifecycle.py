"""Monitors still running when the process ends: finished, not lost.

A script that never calls ``close()`` (no ``with``) used to lose everything recorded since the last
flush (up to 192 steps or 60 s, and the partial epoch): the host and writer threads are daemons,
and Python's exit does not wait for them. One hook finishes every monitor of this process that is
still open, as ``close()`` would, and waits for the host threads of monitors collected without
``close()`` to finish their writes.

The hook runs at the start of ``threading._shutdown()``: after the main module has finished, before
non-daemon threads are joined, and before ``concurrent.futures`` refuses new work (zarr's local
store writes through such an executor: from then on, and from an ``atexit`` handler, every write
fails). It is registered when this module is imported, after ``concurrent.futures.thread``
registered its own, so it runs first (they run in reverse order). A monitor whose last labelling
thread is an ordinary non-daemon thread still running is finished once that thread ends, one
driven by an executor's worker once the worker is idle, one driven by a daemon thread at once
(what that thread does with it afterwards is not recorded, and never raises); monitors that need
no wait go first. Not covered: a monitor created after the hook
ran (a thread that calls ``watch()`` once the main module has ended). Forked children (DataLoader
workers) inherit the registry but never run the hook on it: their copies of a monitor have no
threads, and writing the parent's archive from them would corrupt it. Nothing here raises.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (registers its exit hook before ours: ours runs first)
import itertools
import os
import sys
import threading
import weakref
from typing import Protocol


class Closable(Protocol):
    def _exit_waits(self) -> bool: ...

    def _close_at_exit(self) -> None: ...


class Joinable(Protocol):
    def join(self) -> None: ...


# Reentrant: a garbage collection while it is held may finalize a dropped monitor, whose
# finalizer ends up here on the same thread.
_lock = threading.RLock()
_open: weakref.WeakValueDictionary[int, Closable] = weakref.WeakValueDictionary()
_abandoned: set[Joinable] = set()  # held until they finish (set.add/discard: no lock needed)
_order = itertools.count()
_pid = os.getpid()


def track(monitor: Closable) -> None:
    """Finish ``monitor`` at the process's exit if it is still open then (held weakly)."""
    with _lock:
        _open[next(_order)] = monitor


def wait_at_exit(pipeline: Joinable) -> None:
    """Hold ``pipeline`` (shutting down on its own thread) until :func:`finished`; the exit hook
    waits for it."""
    _abandoned.add(pipeline)


def finished(pipeline: Joinable) -> None:
    _abandoned.discard(pipeline)


def _at_exit() -> None:
    if os.getpid() != _pid:  # a forked child that kept the registry (see _forget)
        return
    # Nothing may escape: an exception here skips the rest of threading's shutdown (other
    # hooks, joining the user's threads). A Ctrl-C stops one monitor's finishing, nothing else.
    with _lock:
        found = [_open.get(key) for key in sorted(_open.keys())]
    monitors = [monitor for monitor in found if monitor is not None]
    monitors.sort(key=lambda monitor: monitor._exit_waits())  # those that need no wait first
    for monitor in monitors:
        try:
            monitor._close_at_exit()
        except KeyboardInterrupt:
            print("streamspec: interrupted while finishing an archive at exit", file=sys.stderr)
        except BaseException as error:  # pragma: no cover - _close_at_exit raises nothing else
            print(f"streamspec: finishing an archive at exit failed: {error!r}", file=sys.stderr)
    try:
        for pipeline in list(_abandoned):
            pipeline.join()
    except KeyboardInterrupt:
        print("streamspec: interrupted while finishing an archive at exit", file=sys.stderr)


def _forget() -> None:
    """In a forked child: its copies of the parent's monitors are not its own to finish."""
    global _lock, _pid
    _lock = threading.RLock()  # the parent's may have been held by another thread at the fork
    _open.clear()
    _abandoned.clear()
    _pid = os.getpid()


def _register() -> None:
    # CPython's hook for work that must run before threads are joined (concurrent.futures uses
    # it); the plain atexit where it is missing or too late (imported while the process exits),
    # which may find zarr's executor shut down.
    try:
        threading._register_atexit(_at_exit)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        atexit.register(_at_exit)


_register()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)
