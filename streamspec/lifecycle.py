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

``SIGTERM`` (a batch scheduler's time limit or preemption, ``docker stop``, ``torchrun`` stopping
its workers) ends a Python process at once, running none of the above: the steps recorded since
the last flush were lost (up to 192 steps or 60 s). While a monitor with an archive that outlives
the process is open, :func:`guard_termination` handles ``SIGTERM`` where it still has its default
disposition, on the main thread: the handler finishes the open monitors as at exit (without
waiting for the threads that drive them: the process is ending) for at most
:data:`TERMINATION_GRACE` seconds on a thread of its own, then ends the process by the same signal,
as it would have ended (its exit status says ``SIGTERM``; a second ``SIGTERM`` meanwhile ends it at
once). A handler installed before ``watch()`` is left alone, and one installed after it that calls
streamspec's (PyTorch Lightning's, which then stops training gracefully) gets a handler that does
nothing: the process then ends through Python's exit, which finishes the monitors.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (registers its exit hook before ours: ours runs first)
import itertools
import os
import signal
import sys
import threading
import time
import weakref
from types import FrameType
from typing import Protocol


class Closable(Protocol):
    def _exit_waits(self) -> bool: ...

    def _close_at_exit(self, terminated: bool = False) -> None: ...

    def _guards_termination(self) -> bool: ...


class Joinable(Protocol):
    def join(self) -> None: ...


# Reentrant: a garbage collection while it is held may finalize a dropped monitor, whose
# finalizer ends up here on the same thread.
_lock = threading.RLock()
_open: weakref.WeakValueDictionary[int, Closable] = weakref.WeakValueDictionary()
_abandoned: set[Joinable] = set()  # held until they finish (set.add/discard: no lock needed)
_order = itertools.count()
_pid = os.getpid()
# Held while monitors are being finished at exit or on SIGTERM: one finishing at a time.
_finishing = threading.Lock()


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
    try:  # (after a SIGTERM's finishing: the process ends once that is done)
        _finishing.acquire()
    except KeyboardInterrupt:
        print("streamspec: interrupted while finishing an archive at exit", file=sys.stderr)
        return
    try:
        _finish_at_exit()
    finally:
        _finishing.release()


def _finish_at_exit() -> None:
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


# Seconds the SIGTERM handler gives the open monitors before the process ends: below the grace
# that schedulers give before SIGKILL (SLURM's default KillWait and Kubernetes' grace period are
# 30 s), far above a normal close (a second or two: ≤ 64 queued steps, one block write).
TERMINATION_GRACE = 20.0
_guarded = False  # the SIGTERM handler is installed (main thread only reads and writes it)


def guard_termination() -> None:
    """Handle ``SIGTERM`` as described above, from now until :func:`release_termination` finds
    no monitor left to guard. Only on the main thread (the only one that may install handlers)
    of a POSIX process, and only where ``SIGTERM`` has its default disposition."""
    global _guarded
    if _guarded or os.name != "posix" or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - not the main interpreter, or no signals
        return
    _guarded = True


def release_termination() -> None:
    """Give ``SIGTERM`` its default disposition back once no open monitor needs the handler
    (called by ``close()``; only on the main thread, only if the handler is still streamspec's)."""
    global _guarded
    if not _guarded or threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        monitors = [m for m in list(_open.values()) if m is not None]
    if any(m._guards_termination() for m in monitors):
        return
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except (ValueError, OSError):  # pragma: no cover
        return
    _guarded = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    if signal.getsignal(signum) is not _on_sigterm:
        # Called by a handler installed after this one (PyTorch Lightning's calls those it
        # found): that one decides how the process ends; Python's exit finishes the monitors.
        return
    global _guarded
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    _guarded = False
    with _lock:
        anything = os.getpid() == _pid and (len(_open) > 0 or bool(_abandoned))
    if not anything:  # (a forked child has no monitors of its own: see _forget)
        signal.raise_signal(signum)
        return
    # The monitors are finished on a thread of its own, and this handler returns at once: the
    # main thread was interrupted at any point, perhaps holding a lock that finishing needs
    # (the host queue's, mid-submit), which it releases only once it runs on. Meanwhile it goes
    # on training, unrecorded (a monitor closed under its training, as at exit); the process
    # ends once they are finished, or after TERMINATION_GRACE seconds.
    try:
        threading.Thread(
            target=_terminate, args=(signum,), name="streamspec-sigterm", daemon=True
        ).start()
    except BaseException:  # no thread at the interpreter's shutdown: end as SIGTERM would
        signal.raise_signal(signum)


def _terminate(signum: int) -> None:
    deadline = time.monotonic() + TERMINATION_GRACE
    try:
        # The exit hook may be finishing them on the main thread (the script ended meanwhile):
        # one at a time.
        if _finishing.acquire(timeout=TERMINATION_GRACE):
            try:
                finisher = threading.Thread(
                    target=_finish_all, name="streamspec-sigterm-close", daemon=True
                )
                finisher.start()
                finisher.join(max(deadline - time.monotonic(), 0.0))
            finally:
                _finishing.release()
    finally:
        os.kill(os.getpid(), signum)


def _finish_all() -> None:
    """Every open monitor finished as at exit, without waiting for the threads driving them."""
    with _lock:
        monitors = [m for m in (_open.get(key) for key in sorted(_open.keys())) if m is not None]
    for monitor in monitors:
        try:
            monitor._close_at_exit(terminated=True)
        except BaseException as error:  # pragma: no cover - _close_at_exit raises nothing else
            print(f"streamspec: finishing an archive on SIGTERM failed: {error!r}", file=sys.stderr)
    for pipeline in list(_abandoned):
        pipeline.join()


def _forget() -> None:
    """In a forked child: its copies of the parent's monitors are not its own to finish."""
    global _lock, _finishing, _pid
    _lock = threading.RLock()  # the parent's may have been held by another thread at the fork
    _finishing = threading.Lock()
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
