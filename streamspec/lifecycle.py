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
disposition (main thread, POSIX), as the default would, after saving: the open monitors are
finished as at exit, on a thread of its own and without waiting for the threads that drive them
(training goes on meanwhile, unrecorded), for at most :data:`TERMINATION_GRACE` seconds; then the
process ends by SIGTERM (its exit status says so; a second SIGTERM meanwhile ends it at once). A
watcher thread on the signal module's wakeup pipe starts this even while the main thread is stuck
in a C call (a hung collective), where a Python handler never runs. Other handlers decide: one
installed before ``watch()`` is left alone; one installed after it that does not call
streamspec's is left to end the process (Python's exit then finishes the monitors); one that
calls it (the usual chaining) hands it the default's job, finish then end, unless it is a
framework's that stops training gracefully itself (PyTorch Lightning's), for which streamspec only
finishes the monitors. Forked children (DataLoader workers) get the default disposition back.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (registers its exit hook before ours: ours runs first)
import contextlib
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

    def _forget_in_child(self) -> None: ...


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
        _finish_open()
    finally:
        _finishing.release()


def _finish_open(terminated: bool = False) -> None:
    """Every open monitor finished as ``close()`` would (``terminated``: on SIGTERM, without
    waiting for the threads driving them), then the host threads of collected ones waited for."""
    with _lock:
        found = [_open.get(key) for key in sorted(_open.keys())]
    monitors = [monitor for monitor in found if monitor is not None]
    monitors.sort(key=lambda monitor: monitor._exit_waits())  # those that need no wait first
    for monitor in monitors:
        try:
            monitor._close_at_exit(terminated)
        except KeyboardInterrupt:
            print("streamspec: interrupted while finishing an archive at exit", file=sys.stderr)
        except BaseException as error:  # pragma: no cover - _close_at_exit raises nothing else
            print(f"streamspec: finishing an archive at exit failed: {error!r}", file=sys.stderr)
    try:
        for pipeline in list(_abandoned):
            pipeline.join()
    except KeyboardInterrupt:
        print("streamspec: interrupted while finishing an archive at exit", file=sys.stderr)


# Seconds the SIGTERM handling gives the open monitors before the process ends: below the grace
# that schedulers give before SIGKILL (SLURM's default KillWait and Kubernetes' grace period are
# 30 s), far above a normal close (a second or two: ≤ 64 queued steps, one block write).
TERMINATION_GRACE = 20.0
_HANDLER_WAIT = 0.5  # seconds the watcher leaves the Python handler to act first
_wakeup: tuple[int, int] | None = None  # the watcher's pipe (read end, write end)
_terminating = threading.Event()  # a SIGTERM is being handled: the exit hook waits no more
_begun = False  # (under _lock) the SIGTERM's finishing has started
_finished = False  # (under _lock) ... and is over
_ending = False  # (under _lock) the process ends by SIGTERM once it is over


def terminating() -> bool:
    """Whether a SIGTERM's finishing has started (waits at exit stop waiting then)."""
    return _terminating.is_set()


def guard_termination() -> None:
    """Handle ``SIGTERM`` as described above, from now until :func:`release_termination` finds
    no monitor left to guard. Only on the main thread (the only one that may install handlers)
    of a POSIX process, and only where ``SIGTERM`` has its default disposition.

    Besides the handler, a watcher thread reads the signal module's wakeup pipe (where it is not
    taken, e.g. by an asyncio loop on the main thread): a Python handler runs only once the main
    thread is back in Python code, and one stuck in a C call (a hung collective, a long kernel)
    would never get there; the watcher starts the finishing at once either way."""
    global _wakeup
    if os.name != "posix" or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:  # (streamspec's already, too)
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - not the main interpreter, or no signals
        return
    try:
        read, write = os.pipe()
    except OSError:  # (EMFILE): the handler without a watcher
        return
    try:
        os.set_blocking(write, False)
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        if previous != -1:  # someone else's (asyncio): theirs stays, no watcher
            signal.set_wakeup_fd(previous)
            raise OSError("wakeup fd taken")
        threading.Thread(
            target=_watch, args=(read,), name="streamspec-signals", daemon=True
        ).start()
    except (ValueError, OSError, RuntimeError):
        os.close(read)
        os.close(write)
        return
    _wakeup = (read, write)


def release_termination() -> None:
    """Give ``SIGTERM`` its default disposition (and the wakeup pipe) back once no open monitor
    needs them; only on the main thread (elsewhere, the handler stays, acting as the default
    would once nothing needs it)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if (signal.getsignal(signal.SIGTERM) is _on_sigterm or _wakeup is not None) and not _guarding():
        _unguard()


def _guarding() -> bool:
    """Whether an open monitor would lose rows to a SIGTERM."""
    with _lock:
        monitors = [m for m in list(_open.values()) if m is not None]
    return any(m._guards_termination() for m in monitors)


def _unguard(child: bool = False) -> None:
    """SIGTERM's default disposition and the wakeup pipe given back (main thread); the watcher
    ends on its pipe's end of file (a forked ``child`` has no watcher: both ends close here)."""
    global _wakeup
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if _wakeup is not None:
            read, write = _wakeup
            _wakeup = None
            current = signal.set_wakeup_fd(-1)
            if current != write:  # replaced since: not ours to clear
                signal.set_wakeup_fd(current)
            os.close(write)
            if child:
                os.close(read)
    except (ValueError, OSError):  # pragma: no cover - off the main thread
        pass


def _watch(read: int) -> None:
    """The watcher: a SIGTERM's byte in the wakeup pipe starts the finishing."""
    try:
        while data := os.read(read, 512):
            if signal.SIGTERM not in data:
                continue
            # The Python handler acts if it runs (the main thread in Python code); this is for a
            # main thread stuck in a C call. Only while streamspec's handler is the installed
            # one: a handler installed later decides (and calls streamspec's for its finishing).
            deadline = time.monotonic() + _HANDLER_WAIT
            while not _begun and time.monotonic() < deadline:
                time.sleep(0.01)
            if not _begun and signal.getsignal(signal.SIGTERM) is _on_sigterm:
                with contextlib.suppress(Exception):  # a second SIGTERM ends it at once
                    _reset_default(signal.SIGTERM)
                _begin(ending=True)
    except OSError:  # pragma: no cover - the pipe closed under it
        pass
    finally:
        os.close(read)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """The Python handler (main thread, once it runs Python code)."""
    handler = signal.getsignal(signum)
    if handler is _on_sigterm:  # installed: the default's stand-in
        signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        _begin(ending=True)
    else:  # called by a handler installed later: it hands over what the default would do,
        _begin(ending=not _graceful(handler))  # unless it stops training gracefully itself


def _graceful(handler: object) -> bool:
    """Whether ``handler`` is a framework's that stops training gracefully on SIGTERM and calls
    the handlers it found for their clean-up only (PyTorch Lightning's signal connector)."""
    module = getattr(type(handler), "__module__", "") or ""
    module = module if module != "builtins" else getattr(handler, "__module__", "") or ""
    return module.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")


def _begin(ending: bool) -> None:
    """Start the SIGTERM's finishing, once: on a thread of its own, so that the main thread
    (interrupted at any point, perhaps holding a lock that finishing needs, such as the host
    queue's mid-submit) goes on and releases it. It goes on training meanwhile, unrecorded (a
    monitor closed under its training, as at exit). Then, if ``ending`` (streamspec's handler is
    the one installed, or was called by a later handler in the default's stead), the process
    ends by SIGTERM; otherwise the handler installed later decides how it ends."""
    global _begun, _ending
    with _lock:
        if os.getpid() != _pid:
            return
        _ending = _ending or ending
        first, die_now = not _begun, _finished and ending
        _begun = True
    if die_now:  # (finished already, before the handler that hands the ending over ran)
        _die(signal.SIGTERM)
    if not first:
        return
    _terminating.set()
    try:
        threading.Thread(target=_terminate, name="streamspec-sigterm", daemon=True).start()
    except BaseException:  # no new thread at the interpreter's shutdown
        if ending:
            _die(signal.SIGTERM)


def _terminate() -> None:
    global _finished
    deadline = time.monotonic() + TERMINATION_GRACE
    try:
        # The exit hook may be finishing them on the main thread (the script ended meanwhile):
        # it stops waiting for threads once _terminating is set; then one at a time.
        if (_guarding() or _abandoned) and _finishing.acquire(timeout=TERMINATION_GRACE):
            try:
                finisher = threading.Thread(
                    target=_finish_open, args=(True,), name="streamspec-sigterm-close", daemon=True
                )
                finisher.start()
                finisher.join(max(deadline - time.monotonic(), 0.0))
            finally:
                _finishing.release()
    finally:
        with _lock:
            _finished = True
            ending = _ending
        if ending:
            _die(signal.SIGTERM)


def _die(signum: int) -> None:
    """End the process by ``signum``'s default action, from any thread: the disposition is reset
    through the C library where the main thread has not run the Python handler yet (stuck in a C
    call); SIGKILL if even that fails."""
    try:
        if signal.getsignal(signum) != signal.SIG_DFL:
            _reset_default(signum)
        os.kill(os.getpid(), signum)
        time.sleep(5.0)  # (delivered to some thread; the process ends meanwhile)
    except BaseException:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _reset_default(signum: int) -> None:
    """``signum``'s default disposition, from any thread: through the C library (Python's
    ``signal.signal`` is for the main thread only, which may be stuck in a C call)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    if libc.signal(signum, None) == ctypes.c_void_p(-1).value:  # (SIG_DFL is NULL)
        raise OSError("signal() failed")


def _forget() -> None:
    """In a forked child: its copies of the parent's monitors are not its own to finish."""
    global _lock, _finishing, _pid, _terminating, _begun, _finished, _ending
    _lock = threading.RLock()  # the parent's may have been held by another thread at the fork
    _finishing = threading.Lock()
    for monitor in list(_open.values()):  # the parent's: inert here (their locks may be held)
        monitor._forget_in_child()
    _open.clear()
    _abandoned.clear()
    _pid = os.getpid()
    _terminating, _begun, _finished, _ending = threading.Event(), False, False, False
    # SIGTERM as by default again (a worker stuck in a C call must still end at once), and the
    # parent's wakeup pipe is not the child's (no watcher thread here).
    _unguard(child=True)


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
