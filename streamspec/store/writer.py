"""Buffered, background writer of a streamspec archive.

The training thread only copies each row into a buffer (:meth:`ArchiveWriter.append_step`);
whole blocks are written by one background thread: grow every array, write the block's region,
then raise the commit counter. One-row appends would rewrite ``zarr.json`` and the partly filled
chunk for every row and array (milliseconds each), and would publish a new shape before its data.

Crash safety (``kill -9`` at any moment): local stores replace files atomically, so each file is
either its old or its new version; rows above the commit counters are ignored by readers and cut
off by the next ``resume``. Only ``close()`` consolidates the metadata (``xarray.open_zarr`` with
its defaults then reads one file); a resumed writer first removes it, before anything grows.
Every chunk is written, even one holding only fill values, so a missing chunk always means damage
(:meth:`Archive.check <streamspec.store.reader.Archive.check>`).

Storage trouble never stops training: a block whose write fails is retried, then given up alone
(its rows are lost, the commit counters never count them, later blocks are written), with one
warning when it happens and a summary at ``close()``. The background thread holds at most one
block besides the buffer; a store slower than training makes ``append_*`` wait for it, but a
store that hangs (a write that never returns, such as on a stale NFS mount) cannot make training
wait for ever: once a store call of the thread has run :data:`_WRITE_TIMEOUT` seconds, the blocks
that would have to wait for it are dropped (counted lost, warned once, summed up at ``close()``)
and ``flush()``/``close()`` stop waiting for it.

A thread blocked inside a store call cannot be stopped, so writes stay on that one background
thread, strictly one after the other, and nobody else writes while one is in flight: a hung call
that returns late finds the store as it left it, and its block goes on (written and committed, or
failed and given up) before any later block; training only stopped waiting for it. Only a
``close()`` that gave up on a hung call (a block's, or one of its own last ones, which run on a
background thread too) leaves it behind: the thread then makes no further store call, and
``close()`` writes nothing either, so the archive is what a run killed during that call leaves
(every committed row readable; rows above the counters cut off by the next resume).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import ZstdCodec
from zarr.core.array_spec import ArrayConfigParams

from streamspec._version import __version__
from streamspec.errors import StreamspecError, StreamspecWarning, outside_stacklevel
from streamspec.layout import RunLayout
from streamspec.store.reader import (
    Archive,
    EpochSteps,
    committed_rows,
    filling_arrays,
    find_archive,
    is_incomplete,
    member_array,
    open_root,
    quiet_partial_files,
    read_epoch_steps,
    resolve_store,
)
from streamspec.store.schema import (
    COMMIT_ATTRS,
    CREATING_ATTR,
    EPOCH_CHUNK_ROWS,
    FILLING_ATTR,
    RESUME_ATTRS,
    RowVariable,
    chunk_rows,
    dimension_coords,
    layout_attrs,
    row_inputs,
    row_variables,
)

# The checksum (4 bytes per chunk) lets Archive.check() find a changed byte, not only a lost file.
_COMPRESSORS = ZstdCodec(level=3, checksum=True)

# Write every chunk, even one of fill values only (e.g. a variable a run never fills, or rank 1's
# ``rank`` coordinate [0]): then a missing chunk is always damage, never "all NaN".
_ARRAY_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}

# Pauses before retrying a failed block write: a transient store error (a network blip, a busy
# file server) costs no row; a broken store costs each block 0.6 s of the background thread.
_RETRY_DELAYS: tuple[float, ...] = (0.1, 0.5)

# Seconds one store call of the background thread (a resize, a chunk, a commit) may run before the
# store counts as hung: the submitters then stop waiting for it (blocks that do not fit beside the
# block under way are dropped), and so do flush() and close(). Generous: a slow store that answers
# is waited for, as before; a hung one holds training up this long at most, once per hang. Read at
# each wait (monkeypatched by the tests).
_WRITE_TIMEOUT = 120.0

# The background threads that close() gave up on while a store call of theirs hung, by store (a
# local path or the store's label): that call may still land, over whatever a later writer of the
# store wrote meanwhile (stale rows over its rows, or its commit counters set back), so a new writer
# of the store waits for it first (see _await_abandoned).
_ABANDONED: dict[str, threading.Thread] = {}
_ABANDONED_LOCK = threading.Lock()

# Group attributes a closed writer leaves, so that a resume never reuses an index whose row was
# lost (or, for steps, not recorded: ``every > 1``). Archives older than them have none; a crash
# leaves them stale, so a resume takes the larger of them and what the committed rows say.
NEXT_STEP_ATTR = "streamspec_next_step"  # the step index after a closed run's last step
NEXT_EPOCH_ATTR = "streamspec_next_epoch"  # the epoch after a closed run's last epoch row

# What LocalStore leaves behind when killed inside an atomic write: ``<name>.<uuid4 hex>.partial``.
_PARTIAL_FILE = re.compile(r"\.[0-9a-f]{32}\.partial$")


@dataclass
class _LostSpan:
    """Rows of consecutive blocks given up (no block of their dimension written in between).

    Attributes:
        seqs: The first and last block number (per row dimension, in the order handed over).
        first: ``step`` (or ``epoch``) of the first row.
        last: ``step`` (or ``epoch``) of the last row.
        rows: How many rows.
    """

    seqs: tuple[int, int]
    first: int
    last: int
    rows: int


@dataclass(eq=False)
class _Block:
    """Rows of one dimension handed to the background thread together.

    Attributes:
        row_dim: ``"step"`` or ``"epoch"``.
        rows: The rows, in order.
        seqs: The first and last block number it holds (consecutive blocks are merged).
        ticket: The last hand-over it holds, among all blocks (``flush`` waits for a ticket).
        counted_lost: Whether its rows are counted in ``_lost`` (once, whoever gives it up).
    """

    row_dim: str
    rows: list[dict[str, np.ndarray]]
    seqs: tuple[int, int]
    ticket: int
    counted_lost: bool = False

    def span(self) -> _LostSpan:
        first, last = int(self.rows[0][self.row_dim]), int(self.rows[-1][self.row_dim])
        return _LostSpan(self.seqs, first, last, len(self.rows))

    def span_text(self) -> str:
        """``"2 step rows (steps 2..3)"``: the block's rows, for messages."""
        return _rows_text(self.row_dim, [self.span()])


class _Abandoned(BaseException):
    """Raised in the background thread before a store call once ``close()`` gave up on it: a
    hung write that returns late must not be followed by any other (a BaseException, so that no
    ``except Exception`` takes it for a failed write and retries)."""


class ArchiveWriter:
    """Write one run's rows to a Zarr v3 archive without making training wait for I/O.

    Args:
        store: A local path, an fsspec URL, a Zarr store object, or ``None`` for a new
            in-memory store.
        layout: What the run records; fixes every array's shape but the first dimension.
        resume: Continue an existing archive (its layout must match) instead of refusing it.
            A missing archive is created either way, and so is one whose creation a killed
            process left unfinished.
        chunk_steps: Rows per chunk along ``step`` (fewer for very wide layouts, so that one
            chunk stays under 64 MiB uncompressed).
        flush_every: Buffered steps that trigger a background write. At most ``2 *
            flush_every`` rows are unwritten at any time (the buffer and the block being
            written): what a crash can lose. While the store hangs (a store call running
            :data:`_WRITE_TIMEOUT` seconds), blocks beyond that are dropped, not waited for.

    Raises:
        StreamspecError: if an archive exists and ``resume`` is False, if ``store`` holds
            something else, or if a resumed archive's layout differs from ``layout`` (a resume
            may add an optional variable of ``layout.extras``, never leave one out).

    Example:
        >>> with ArchiveWriter("runs/exp1.zarr", layout) as writer:  # doctest: +SKIP
        ...     writer.append_step({"sigma": sigma, "count": count}, step=0, epoch=0)
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Store | None,
        layout: RunLayout,
        *,
        resume: bool = False,
        chunk_steps: int = 256,
        flush_every: int = 256,
    ) -> None:
        for name, value in (("chunk_steps", chunk_steps), ("flush_every", flush_every)):
            if not isinstance(value, int) or value < 1:
                raise StreamspecError.build(
                    expected=f"{name} a positive int", got=repr(value), fix=f"pass {name}=256"
                )
        self._layout = layout
        self._flush_every = flush_every
        self._lock: _DirectoryLock | None = None
        if store is None:
            self._store: Store = zarr.storage.MemoryStore()
            self._label = repr(self._store)
            self._key = self._label
            existing = None
            path = None
        else:
            self._store, self._label, path = resolve_store(store, read_only=False)
            self._key = os.path.abspath(path) if path is not None else self._label
            _await_abandoned(self._key, self._label)
            if path is not None:
                self._lock = _DirectoryLock.acquire(path, self._label)
        try:
            if store is not None:
                existing = find_archive(self._store, self._label, path, incomplete_ok=True)
            if existing is None or is_incomplete(existing):
                self._group = self._create(chunk_steps, replace=existing is not None)
            elif not resume:
                raise StreamspecError.build(
                    expected=f"no archive at {self._label} (streamspec never overwrites one)",
                    got="an existing streamspec archive",
                    fix="pass resume=True to continue it, or choose a new path",
                )
            else:
                self._group = self._resume(existing, chunk_steps, path)
        except BaseException:
            if self._lock is not None:
                self._lock.release(remove_if_empty=True)
            raise

        self._committed = committed_rows(self._group)
        self._steps_before = self._committed["step"]  # committed by earlier sessions
        self._arrays = {
            v.name: member_array(self._group, v.name).with_config(_ARRAY_CONFIG)
            for v in row_variables(layout=self._layout)
        }
        # A closed run recording every n-th step went on past its last recorded step: it left
        # the next step's index (a crash leaves only the committed rows to go by).
        self._start_step = max(
            _next_index(self._arrays["step"], self._committed["step"]),
            _int_attr(self._group.attrs.get(NEXT_STEP_ATTR)),
        )
        # Likewise for epochs: a lost epoch row left its epoch free in ``epoch`` while the
        # committed steps already carry it (``step_epoch``); a closed run left the next epoch, a
        # crash the epoch of its last committed step (the epochs before it are over).
        self._last_step_epoch = _last_value(self._arrays["step_epoch"], self._committed["step"])
        self._start_epoch = max(
            _next_index(self._arrays["epoch"], self._committed["epoch"]),
            self._last_step_epoch,
            _int_attr(self._group.attrs.get(NEXT_EPOCH_ATTR)),
        )
        # Bounds for the next rows (checked in the training thread, before buffering).
        self._last_step = self._start_step - 1
        self._last_epoch_row = self._start_epoch - 1

        self._buffer: list[dict[str, np.ndarray]] = []
        # Everything below is shared with the background thread and guarded by ``_written``.
        # Blocks handed over but not yet written, oldest first. The thread takes all of them at
        # once (a batch), merging consecutive blocks of one dimension (e.g. a partial step block
        # and an epoch row); ``_writing`` holds the batch's blocks not finished yet, the first
        # one under way, its current store call since ``_writing_since``. ``_unwritten`` counts
        # the rows of both; a
        # submitter waits (``_written``) while it would exceed ``flush_every`` (see ``_submit``).
        self._pending: list[_Block] = []
        self._writing: list[_Block] = []
        self._writing_since: float | None = None
        self._unwritten = 0
        self._written = threading.Condition()
        # The one background thread (None while idle: it ends when nothing is pending, so that
        # a writer never closed leaves no thread behind). A daemon, so that it does not itself keep
        # the interpreter from exiting; a store call blocked in the operating system (a local path
        # on a stale NFS mount) still does: LocalStore does its file I/O on zarr's worker threads,
        # which Python joins at exit.
        self._thread: threading.Thread | None = None
        self._next_seq = dict.fromkeys(COMMIT_ATTRS, 0)  # block numbers per row dimension
        self._tickets = 0  # blocks handed over (dropped ones aside)
        self._done = 0  # the last ticket finished (written or given up)
        # Rows given up, per row dimension: after their last attempt (background thread), or
        # dropped by a submitter or close() because the store hung.
        self._lost: dict[str, list[_LostSpan]] = {d: [] for d in COMMIT_ATTRS}
        self._first_loss: str | None = None  # the error of the first failed block
        self._hang: str | None = None  # the rows of the first block found hung
        # The store counts as hung from a wait that timed out until a block is written again:
        # meanwhile submitters and flush() do not wait (a store whose every call runs past the
        # timeout would otherwise hold training up once per call, for as long as it hangs).
        self._hung = False
        self._abandoned = False  # close() gave up on a hung write: no more store calls
        # Row dimensions whose arrays a lost block may have left longer than the committed rows.
        self._ragged: set[str] = set()
        self._closed = False

    # ------------------------------------------------------------------ public API
    @property
    def layout(self) -> RunLayout:
        """The layout rows must follow."""
        return self._layout

    @property
    def start_step(self) -> int:
        """The first step index this session may write: last committed ``step`` + 1, or 0."""
        return self._start_step

    @property
    def start_epoch(self) -> int:
        """The first epoch this session may write: last committed ``epoch`` + 1, or 0; later if
        an epoch row was lost (the next epoch a closed run recorded, or the epoch of the last
        committed step)."""
        return self._start_epoch

    @property
    def store(self) -> Store:
        """The Zarr store written to."""
        return self._store

    @property
    def lost_rows(self) -> dict[str, int]:
        """Rows given up, per row dimension (``{"step": 0, "epoch": 0}`` while none was lost):
        their block failed every write attempt, or was dropped because the store hung (see
        :data:`_WRITE_TIMEOUT`); ``close()`` reports them."""
        with self._written:
            return {d: sum(span.rows for span in spans) for d, spans in self._lost.items()}

    def unfinished_epoch(self) -> EpochSteps:
        """The steps of epoch :attr:`start_epoch` that earlier sessions committed.

        A run killed mid-epoch committed some of that epoch's steps but not its epoch row; a
        resumed run continues the epoch and feeds these rows to its Welch accumulator
        (``GroupWelch.update_batch(unfinished.sigma)``), so the epoch's tests cover all its
        steps. Empty (``n_steps == 0``) for a new archive or one closed at an epoch's end.

        Returns:
            ``sigma`` ``[n, layer, kind, group, rank]`` float32, ``count`` ``[n, group]``,
            ``step`` ``[n]`` of the committed steps whose ``step_epoch`` is ``start_epoch``.
        """
        return read_epoch_steps(self._group, self._steps_before, self._start_epoch)

    def append_step(self, row: Mapping[str, Any], *, step: int, epoch: int) -> None:
        """Buffer one step's row; a full buffer is handed to the background thread.

        Args:
            row: The step variables the caller computes: ``sigma`` ``[L, 3, C, k]`` (float32)
                and ``count`` ``[C]`` (int64). Arrays are copied, so buffers may be reused.
            step: Index of the step among all training steps; increases from row to row.
            epoch: Epoch the step belongs to (stored as ``step_epoch``); never decreases.

        Raises:
            StreamspecError: if the writer is closed, ``row`` has missing, unknown or misshaped
                variables, or ``step``/``epoch`` go backwards.
        """
        self._check_open()
        step, epoch = int(step), int(epoch)
        if step <= self._last_step:
            raise StreamspecError.build(
                expected=f"step > {self._last_step} (the last step written)",
                got=f"step={step}",
                fix="pass increasing step indices; a resumed archive continues at "
                "writer.start_step",
            )
        if epoch < self._last_step_epoch:
            raise StreamspecError.build(
                expected=f"epoch >= {self._last_step_epoch} (the epoch of the last step)",
                got=f"epoch={epoch} at step {step}",
                fix="pass the epoch each step belongs to; epochs never go back",
            )
        self._buffer.append(self._checked_row("step", row, {"step": step, "epoch": epoch}))
        self._last_step, self._last_step_epoch = step, epoch
        if len(self._buffer) >= self._flush_every:
            self._submit_steps()

    def append_epoch(self, row: Mapping[str, Any], *, epoch: int) -> None:
        """Write one epoch's row after the buffered steps (in the background thread).

        Args:
            row: ``sigma_epoch`` ``[L, 3, C, k]`` (float32), ``welch_t`` and ``welch_p``
                ``[L, 3, P, k]`` (stored as float64), ``P = C(C-1)/2`` pairs in
                ``layout.pairs`` order.
            epoch: The epoch number; increases from row to row.

        Raises:
            StreamspecError: as :meth:`append_step`.
        """
        self._check_open()
        epoch = int(epoch)
        if epoch <= self._last_epoch_row:
            raise StreamspecError.build(
                expected=f"epoch > {self._last_epoch_row} (the last epoch written)",
                got=f"epoch={epoch}",
                fix="write each epoch once, in order; a resumed archive continues at "
                "writer.start_epoch",
            )
        checked = self._checked_row("epoch", row, {"epoch": epoch})
        self._last_epoch_row = epoch
        self._submit_steps()  # an epoch is committed only after its steps
        self._submit("epoch", [checked])

    def flush(self, wait: bool = True) -> None:
        """Hand buffered steps to the background thread; with ``wait``, block until written.

        Never raises for storage trouble: a block that fails every attempt is lost alone, with a
        :class:`~streamspec.errors.StreamspecWarning` the first time (:attr:`lost_rows`). Never
        waits for a hung store either: it returns once a store call has taken
        :data:`_WRITE_TIMEOUT` seconds (the blocks handed over are written if the store answers
        again, and ``close()`` reports them if it never does).
        """
        self._submit_steps()
        if wait:
            with self._written:
                target = self._tickets
                self._wait_unless_hung(lambda: self._done >= target, sticky=True)

    def close(self, next_step: int | None = None) -> None:
        """Write everything buffered, wait, stop the thread, then consolidate the metadata.

        ``next_step``: the index of the step after the run's last one (recorded or not), kept
        for a resume of a run that records every n-th step. With it, or if an epoch row was lost,
        the epoch after the last epoch row appended is kept too: a resume never reuses the index
        of a step or epoch whose row was lost.

        Consolidated metadata (the root ``zarr.json`` holding every array's metadata) lets
        ``xarray.open_zarr(path)`` and ``xarray.open_datatree(path, engine="zarr")`` read a finished
        archive with their defaults. A resumed writer removes it before growing any array.
        Calling ``close`` again does nothing.

        Storage trouble is reported, never raised: a :class:`~streamspec.errors.StreamspecWarning`
        sums up the rows that were not written (:attr:`lost_rows`), and another one says if the
        metadata could not be consolidated. The rows written stay readable either way.

        A hung store is waited for at most :data:`_WRITE_TIMEOUT` seconds (from the start of the
        store call under way, be it a block's or one of those above). Then the blocks not written
        are counted lost and ``close`` returns without writing anything more: the archive is left
        as a run killed during the hung call leaves it, every committed row readable. A new writer
        of the store waits for the hung call (which may still land) and refuses the store while it
        hangs. A call blocked in the operating system (a local path on a stale NFS mount) still
        keeps the interpreter from exiting until it returns: Python joins zarr's I/O threads at
        exit (``os._exit`` does not).
        """
        if self._closed:
            return
        self._closed = True
        self.closing()
        try:
            try:
                self._submit_steps()
            finally:
                finished = self._finish_writes()
            # Its last store calls on a background thread too, so that a hung store cannot hold
            # it.
            notes = (
                self._in_background(lambda: self._finish_archive(next_step)) if finished else None
            )
        finally:
            if self._lock is not None:
                self._lock.release()
        for note in notes or []:
            warnings.warn(note, StreamspecWarning, stacklevel=2)
        if any(self._lost.values()):
            warnings.warn(self._loss_summary(), StreamspecWarning, stacklevel=2)
        elif notes is None:
            warnings.warn(f"streamspec: {self._abandoned_text()}", StreamspecWarning, stacklevel=2)

    def closing(self) -> None:
        """Mark this writer as about to close (called from any thread, never waits): a new
        writer of its archive in this process then waits for its lock instead of refusing it
        (a monitor collected without close(), whose host thread closes this writer)."""
        if self._lock is not None:
            self._lock.closing = True

    def archive(self) -> Archive:
        """A reader over the same store, seeing the committed rows (follows the run)."""
        return Archive(self._store, self._label)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"ArchiveWriter({self._label}, {state}, committed={self._committed})"

    # ------------------------------------------------------------------ training thread
    def _check_open(self) -> None:
        if self._closed:
            raise StreamspecError.build(
                expected="an open writer",
                got="a closed one",
                fix="append before close(), or open a new ArchiveWriter(..., resume=True)",
            )

    def _checked_row(
        self, row_dim: str, row: Mapping[str, Any], keywords: dict[str, int]
    ) -> dict[str, np.ndarray]:
        """Copy ``row`` into arrays of the stored dtypes, adding the keyword-filled variables."""
        inputs = row_inputs(row_dim, self._layout)
        names = {v.name for v in inputs}
        unknown = sorted(set(row) - names)
        missing = sorted(v.name for v in inputs if v.required and v.name not in row)
        if unknown or missing:
            raise StreamspecError.build(
                expected=f"a {row_dim} row with variables {sorted(names)}",
                got=f"missing {missing}, unknown {unknown}",
                fix=f"pass a dict with exactly the {row_dim} variables of "
                "streamspec.store.schema.ROW_VARIABLES",
            )
        checked: dict[str, np.ndarray] = {}
        for v in row_variables(row_dim, self._layout):
            if v.keyword is not None:
                checked[v.name] = np.array(keywords[v.keyword], dtype=v.dtype)
                continue
            if v.name not in row:
                continue  # optional and absent: written as fill values
            value = np.array(row[v.name], dtype=v.dtype, copy=True)
            shape = v.row_shape(self._layout)
            if value.shape != shape:
                raise StreamspecError.build(
                    expected=f"{v.name} of shape {list(shape)} {list(v.dims[1:])}",
                    got=f"shape {list(value.shape)}",
                    fix=f"pass one {row_dim}'s {v.name} for the writer's layout",
                )
            checked[v.name] = value
        return checked

    def _submit_steps(self) -> None:
        if self._buffer:
            rows, self._buffer = self._buffer, []
            self._submit("step", rows)

    def _submit(self, row_dim: str, rows: list[dict[str, np.ndarray]]) -> None:
        thread, warning = None, None
        with self._written:
            seq = self._next_seq[row_dim]
            self._next_seq[row_dim] += 1
            # Back-pressure: hand over a block only while the thread holds at most one block's
            # rows. A store slower than training then slows the submitter (in a watched run the
            # host thread, whose full queue in turn slows training) instead of piling rows up in
            # memory, where a crash would lose them all; writing here, beside the thread, would
            # break the order of commits. Only a hung store drops rows: once the store call under
            # way has run _WRITE_TIMEOUT seconds, a block that does not fit beside it is given up,
            # and so is every such block (without waiting) until a block is written again.
            if self._wait_unless_hung(
                lambda: self._unwritten == 0 or self._unwritten + len(rows) <= self._flush_every,
                sticky=True,
            ):
                self._tickets += 1
                self._pending.append(_Block(row_dim, rows, (seq, seq), self._tickets))
                self._unwritten += len(rows)
                self._written.notify_all()
                thread = self._new_thread()
            else:
                warning = self._drop(_Block(row_dim, rows, (seq, seq), ticket=0))
        if thread is not None:
            thread.start()  # without the lock: it takes the blocks pending now as one batch
        if warning is not None:
            with contextlib.suppress(Warning):  # as in _lose: close() repeats it in any case
                warnings.warn(warning, StreamspecWarning, stacklevel=4)

    def _drop(self, block: _Block) -> str | None:
        """Count a block lost because the store hung (the caller holds ``_written``).

        Returns:
            The warning to give if this is the first block dropped, else None.
        """
        self._record_lost(block)
        if self._hang is not None:
            return None
        self._hang = self._writing[0].span_text() if self._writing else "a block"
        return (
            f"streamspec: a write of {self._hang} to {self._label} has not returned after "
            f"{_WRITE_TIMEOUT:g} s (the store looks hung); {block.span_text()} and the blocks "
            "after them are dropped while it hangs, instead of making training wait (warned "
            "once; writing goes on if the store answers again, and close() reports the total)"
        )

    def _new_thread(self) -> threading.Thread | None:
        """The background thread to start, unless one runs (the caller holds ``_written``)."""
        if not self._thread_ended():
            return None
        self._thread = threading.Thread(target=self._run, name="streamspec-writer", daemon=True)
        return self._thread

    def _thread_ended(self) -> bool:
        """No background thread, or it ended (a thread not started yet is about to run)."""
        thread = self._thread
        return thread is None or (thread.ident is not None and not thread.is_alive())

    def _wait_unless_hung(self, ready: Callable[[], bool], *, sticky: bool = False) -> bool:
        """Wait (holding ``_written``) until ``ready()``, or until the store call under way has
        run :data:`_WRITE_TIMEOUT` seconds: a hung store is waited for once, never for ever.
        With ``sticky``, not at all while the store counts as hung (``_hung``).

        Returns:
            Whether ``ready()`` came true (False: the store is hung, or was given up at close).
        """
        while not ready():
            if self._abandoned or self._thread_ended() or (sticky and self._hung):
                return False  # nothing will ever make it true, or not soon
            since = self._writing_since
            left = _WRITE_TIMEOUT if since is None else since + _WRITE_TIMEOUT - time.monotonic()
            if left <= 0:
                self._hung = True
                return False
            # None: the thread is taking its next batch, and notifies as each block starts.
            self._written.wait(left)
        return True

    def _finish_writes(self) -> bool:
        """Let the thread write every block handed over and end; on a hung write, give up.

        Returns:
            True once everything is written (or given up after failing) and the thread is gone;
            False if a write hung: its block and the ones after it are then counted lost, and
            the thread makes no store call any more (see :class:`_Abandoned`).
        """
        with self._written:
            if not self._wait_unless_hung(lambda: not self._pending and not self._writing):
                self._abandoned = True
                if self._hang is None:
                    self._hang = self._writing[0].span_text() if self._writing else "a block"
                for block in (*self._writing, *self._pending):
                    self._record_lost(block)
                self._writing, self._pending, self._unwritten = [], [], 0
                self._written.notify_all()
                self._leave_behind(self._thread)
                return False
            thread = self._thread
        if thread is not None:
            thread.join()  # it found nothing pending: it is ending
        return True

    def _in_background(self, job: Callable[[], list[str]]) -> list[str] | None:
        """Run ``job`` on a background thread, timed like a block's write (:meth:`_store_call`).

        Returns:
            What ``job`` returned, or None if a store call of it hung: close() then gives up on
            the thread, which makes no store call after the hung one (:class:`_Abandoned`).

        Raises:
            Whatever else ``job`` raised (a bug: storage trouble is returned).
        """
        done: list[list[str]] = []
        errors: list[BaseException] = []

        def run() -> None:
            notes: list[str] = []
            try:
                notes = job()
            except _Abandoned:
                return
            except BaseException as exc:
                errors.append(exc)
            with self._written:
                done.append(notes)
                self._written.notify_all()

        thread = threading.Thread(target=run, name="streamspec-writer", daemon=True)
        with self._written:
            self._thread, self._writing_since = thread, time.monotonic()
        thread.start()
        with self._written:
            if not self._wait_unless_hung(lambda: bool(done)):
                self._abandoned = True
                self._leave_behind(thread)
                return None
        thread.join()
        if errors:
            raise errors[0]
        return done[0]

    def _leave_behind(self, thread: threading.Thread | None) -> None:
        """close() gave up on ``thread``'s hung store call: a new writer of the store waits for
        it (the call may still land)."""
        if thread is not None and thread.is_alive():
            with _ABANDONED_LOCK:
                _ABANDONED[self._key] = thread

    def _record_lost(self, block: _Block) -> None:
        """Count a block's rows lost, in one span with the lost blocks just before and after it
        (the caller holds ``_written``; blocks are given up out of order when the store hangs)."""
        if block.counted_lost:  # e.g. by _lose, before close() gave up on its cutting back
            return
        block.counted_lost = True
        spans = self._lost[block.row_dim]
        new = block.span()
        at = len(spans)
        while at and spans[at - 1].seqs[0] > new.seqs[0]:
            at -= 1
        spans.insert(at, new)
        if at + 1 < len(spans) and new.seqs[1] + 1 == spans[at + 1].seqs[0]:
            after = spans.pop(at + 1)
            new.seqs, new.last, new.rows = (
                (new.seqs[0], after.seqs[1]),
                after.last,
                new.rows + after.rows,
            )
        if at and spans[at - 1].seqs[1] + 1 == new.seqs[0]:
            before = spans[at - 1]
            before.seqs, before.last = (before.seqs[0], new.seqs[1]), new.last
            before.rows += new.rows
            del spans[at]

    # ------------------------------------------------------------------ background thread
    def _run(self) -> None:
        """The background thread: write the pending blocks, a batch at a time, until none is
        left (a later hand-over starts a new thread)."""
        while True:
            with self._written:
                if self._abandoned or not self._pending:
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return
                batch = _merged(self._pending)
                self._pending, self._writing = [], list(batch)
            if not self._write_batch(batch):
                return

    def _write_batch(self, batch: list[_Block]) -> bool:
        """Write the blocks of a batch in order; False once close() gave up on the thread."""
        for i, block in enumerate(batch):
            with self._written:
                if self._abandoned:
                    return False
                self._writing_since = time.monotonic()
                self._written.notify_all()  # waiters time the hang from here on
            try:
                written = self._write_rows(block)
            except _Abandoned:
                return False
            except BaseException as exc:
                # Not an Exception (those are retried and given up in _write_rows), e.g. an
                # asyncio.CancelledError from the store: this block and the later ones of the
                # batch are lost, counted, and stop holding the submitters' backpressure.
                error = RuntimeError(f"{type(exc).__name__}: {exc}")
                try:
                    for lost in batch[i:]:
                        with contextlib.suppress(Exception):
                            self._lose(lost, error)
                except _Abandoned:
                    return False
                self._finished(batch[i:])
                return True
            self._finished([block], written=written)
        return True

    def _finished(self, blocks: list[_Block], *, written: bool = False) -> None:
        """Blocks written or given up (the first ones of ``_writing``): release their rows.
        A block ``written`` ends a hang (the store answers again)."""
        with self._written:
            if self._abandoned:  # close() counted them lost already
                return
            if written:
                self._hung = False
            del self._writing[: len(blocks)]
            self._unwritten -= sum(len(block.rows) for block in blocks)
            self._done = max(self._done, *(block.ticket for block in blocks))
            self._writing_since = None
            self._written.notify_all()

    def _finish_archive(self, next_step: int | None) -> list[str]:
        """close()'s last store calls, after every block: cut back, next indices, consolidate.

        Returns:
            The warnings to give (storage trouble, reported and never raised).
        """
        notes: list[str] = []
        if self._first_loss is not None:
            self._repair()
        # The indices after the last rows, also of rows lost at the end: never reused on resume.
        # The next epoch goes along with the next step, and alone only if an epoch row was lost
        # (otherwise the committed rows say it). One write of the root's metadata, like a commit
        # (after _repair, the counters it holds in memory are the committed ones).
        ends: dict[str, int] = {}
        if next_step is not None:
            ends[NEXT_STEP_ATTR] = int(next_step)
        if ends or self._lost["epoch"]:
            ends[NEXT_EPOCH_ATTR] = self._last_epoch_row + 1
        if ends:
            self._store_call()
            try:
                self._group.update_attributes(ends)
            except Exception as error:  # storage trouble is reported, never raised
                notes.append(
                    f"streamspec: could not record the next step and epoch indices in "
                    f"{self._label} ({type(error).__name__}: {error}); a resume restarts the "
                    "counts after the last recorded step and epoch"
                )
        if not self._ragged:  # consolidated shapes must match the committed rows
            notes.extend(self._consolidate())
        return notes

    def _check_abandoned(self) -> None:
        """Raise :class:`_Abandoned` once close() gave up on the background thread."""
        if self._abandoned:
            raise _Abandoned

    def _store_call(self) -> None:
        """Before each store call of the background thread: none after a call close() gave up
        on (:class:`_Abandoned`); the waiters time a hang from here (a slow store that answers
        call after call is waited for)."""
        self._check_abandoned()
        self._writing_since = time.monotonic()

    def _write_rows(self, block: _Block) -> bool:
        """Write one block, retried after each of :data:`_RETRY_DELAYS`; if every attempt fails,
        give its rows up: the next block is written where this one would have been.

        Returns:
            Whether its rows are committed (False: given up).
        """
        error: Exception | None = None
        for delay in (0.0, *_RETRY_DELAYS):
            time.sleep(delay)
            try:
                self._write_block(block.row_dim, block.rows)
            except Exception as exc:
                error = exc
            else:
                self._ragged.discard(block.row_dim)
                return True
        assert error is not None
        return self._lose(block, error)

    def _write_block(self, row_dim: str, rows: list[dict[str, np.ndarray]]) -> None:
        """Grow each array of ``row_dim``, write the rows, then commit them (in that order).

        Zarr changes a group's attributes in memory before it saves them: an attempt that fails
        at its commit leaves its counter there, so every commit writes both counters anew.
        """
        start = self._committed[row_dim]
        stop = start + len(rows)
        variables = row_variables(row_dim, self._layout)
        blocks = {v.name: _stack(v, rows, self._layout) for v in variables}
        self._ragged.add(row_dim)
        # Before each store call: a call that hung until close() gave up on it is the last.
        for v in variables:
            array = self._arrays[v.name]
            self._store_call()
            array.resize((stop, *array.shape[1:]))
        for v in variables:
            array = self._arrays[v.name]
            # One chunk per write call: zarr writes a call's chunks concurrently, and when one
            # fails the others still land, possibly after a retry or the next block was written
            # (stale rows over committed ones). One at a time, nothing is left in flight.
            rows_per_chunk = array.chunks[0]
            lo = start
            while lo < stop:
                hi = min(stop, (lo // rows_per_chunk + 1) * rows_per_chunk)
                self._store_call()
                array[lo:hi] = blocks[v.name][lo - start : hi - start]
                lo = hi
        counters = {**self._committed, row_dim: stop}
        self._store_call()
        self._commit(counters)
        self._committed[row_dim] = stop

    def _commit(self, counters: dict[str, int], extra: Mapping[str, int] | None = None) -> None:
        """Save both commit counters (and ``extra`` attributes) in one write of the root's
        metadata (``attrs.update`` saves once per key: a failure in between left the step
        counter ahead of its rows)."""
        attrs = {COMMIT_ATTRS[d]: n for d, n in counters.items()}
        self._group.update_attributes({**attrs, **(extra or {})})

    def _stored_counter(self, row_dim: str) -> int | None:
        """The commit counter of ``row_dim`` as the store holds it (None if unreadable): a
        commit reported as failed may still have landed (a timeout after the write)."""
        try:
            stored = zarr.open_group(store=self._group.store, path=self._group.path, mode="r")
            return int(committed_rows(stored)[row_dim])
        except Exception:
            return None

    def _lose(self, block: _Block, error: Exception) -> bool:
        """Record a block given up, warn the first time, and cut its arrays back if possible.

        Returns:
            True if its commit landed after all (the block is written), else False.
        """
        row_dim, rows = block.row_dim, block.rows
        self._store_call()
        stored = self._stored_counter(row_dim)
        if stored == self._committed[row_dim] + len(rows):  # its commit landed after all
            self._committed[row_dim] = stored
            self._ragged.discard(row_dim)
            return True
        reason = f"{type(error).__name__}: {error}"
        with self._written:
            self._check_abandoned()  # close() counted it lost already
            self._record_lost(block)
            first, self._first_loss = self._first_loss is None, self._first_loss or reason
        if stored is not None:  # never cut below a counter the store may hold
            self._trim(row_dim)
            if row_dim == "epoch":
                self._save_next_epoch(int(rows[-1]["epoch"]) + 1)
        if not first:
            return False
        attempts = 1 + len(_RETRY_DELAYS)
        with contextlib.suppress(Warning):
            # From this thread a warning turned into an error (``-W error``) would only end the
            # drain; close() repeats the loss in the caller's thread.
            warnings.warn(
                f"streamspec: writing {block.span_text()}"
                f" to {self._label} failed {attempts} times ({reason}); those rows are lost, "
                "training and the later rows go on (warned once; close() reports the total)",
                StreamspecWarning,
                stacklevel=1,
            )
        return False

    def _save_next_epoch(self, next_epoch: int) -> None:
        """After a lost epoch row, record the epoch after it at once (best effort), with the
        committed counters (a failed commit may have left its own in memory): a process killed
        before it commits a step of the next epoch or closes would otherwise resume into the
        lost epoch, whose row is gone but whose steps are committed."""
        self._store_call()
        with contextlib.suppress(Exception):
            self._commit(dict(self._committed), {NEXT_EPOCH_ATTR: next_epoch})

    def _trim(self, row_dim: str) -> None:
        """Cut the arrays of ``row_dim`` back to the committed rows (best effort: the store may
        still fail; readers and a resume cut to the commit counter anyway)."""
        stop = self._committed[row_dim]
        try:
            for v in row_variables(row_dim, self._layout):
                array = self._arrays[v.name]
                self._store_call()
                array.resize((stop, *array.shape[1:]))
        except Exception:
            return
        self._ragged.discard(row_dim)

    def _repair(self) -> None:
        """After a loss: arrays back to the committed rows, both counters saved anew."""
        for row_dim in sorted(self._ragged):
            self._trim(row_dim)
        self._store_call()
        with contextlib.suppress(Exception):
            self._commit(dict(self._committed))

    def _loss_summary(self) -> str:
        parts = [_rows_text(d, spans) for d, spans in self._lost.items() if spans]
        causes = []
        if self._first_loss is not None:
            attempts = 1 + len(_RETRY_DELAYS)
            causes.append(f"failed {attempts} times each, first error: {self._first_loss}")
        if self._hang is not None:
            causes.append(
                f"the store hung: a write of {self._hang} did not return within "
                f"{_WRITE_TIMEOUT:g} s, and the blocks that would have waited for it were dropped"
            )
        if self._abandoned:
            # The hung call itself may still land (a commit too) if the store answers later.
            outcome = (
                f"{self._abandoned_text()}; the block whose store call hung is counted here, "
                "though it may yet land if the store answers"
            )
        else:
            outcome = "every other row was written, and the commit counters count only those"
        return (
            f"streamspec: {' and '.join(parts)} were not written to {self._label} "
            f"({'; '.join(causes) or 'the background writer stopped'}); {outcome}"
        )

    def _abandoned_text(self) -> str:
        return (
            f"close() stopped waiting for a store call to {self._label} that did not return "
            f"within {_WRITE_TIMEOUT:g} s, and wrote nothing more: the archive is as a run killed "
            "then leaves it (every committed row readable; the next step and epoch indices and "
            "the consolidated metadata not recorded; a resume cuts off the rows above the commit "
            "counters)"
        )

    # ------------------------------------------------------------------ creation / resume
    def _create(self, chunk_steps: int, *, replace: bool) -> zarr.Group:
        """Create the archive; ``replace`` one whose creation was interrupted."""
        attrs = {
            **layout_attrs(self._layout),
            "streamspec_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **{counter: 0 for counter in COMMIT_ATTRS.values()},
        }
        try:
            group = zarr.create_group(
                self._store,
                zarr_format=3,
                attributes={CREATING_ATTR: __version__},
                overwrite=replace,
            )
        except zarr.errors.ContainsArrayError as exc:
            raise StreamspecError.build(
                expected=f"an empty store or a streamspec archive at {self._label}",
                got="a Zarr array",
                fix="choose a new path or an empty store",
            ) from exc
        except OSError as exc:  # a file where a directory is needed, no permission, disk full
            raise _not_writable(self._label, exc) from exc
        for name, values in dimension_coords(self._layout).items():
            array = group.create_array(
                name,
                shape=values.shape,
                chunks=(max(values.size, 1),),
                dtype=str if values.dtype.kind == "U" else values.dtype,
                compressors=_COMPRESSORS,
                dimension_names=(name,),
                config=_ARRAY_CONFIG,
            )
            if values.size:
                array[:] = values
        for v in row_variables(layout=self._layout):
            self._create_row_array(group, v, rows=0, chunk_steps=chunk_steps)
        group.attrs.put(attrs)  # last: from here on it is an archive
        return group

    def _create_row_array(
        self,
        group: zarr.Group,
        v: RowVariable,
        *,
        rows: int,
        chunk_steps: int,
        overwrite: bool = False,
    ) -> zarr.Array:
        requested = chunk_steps if v.row_dim == "step" else EPOCH_CHUNK_ROWS
        row_shape = v.row_shape(self._layout)
        coords = [
            c.name for c in row_variables(v.row_dim, self._layout) if c.coordinate and c is not v
        ]
        return group.create_array(
            v.name,
            shape=(rows, *row_shape),
            # A chunk must be at least 1 wide, even along an empty dimension (one group: no pair).
            chunks=(chunk_rows(v, self._layout, requested), *(max(n, 1) for n in row_shape)),
            dtype=v.dtype,
            fill_value=v.fill_value,
            compressors=_COMPRESSORS,
            dimension_names=v.dims,
            attributes={"coordinates": " ".join(coords)} if coords and not v.coordinate else {},
            config=_ARRAY_CONFIG,
            overwrite=overwrite,
        )

    def _consolidate(self) -> list[str]:
        """Consolidate the metadata (background thread, at close); the warning to give, if any."""
        if not self._store.supports_consolidated_metadata:
            return []
        self._store_call()
        try:
            # "not part of the Zarr v3 specification": known, and readers never need it; and the
            # live writer's temporary files (as quiet_partial_files).
            with _ignoring("Consolidated metadata", r"Object at .*\.partial is not recognized"):
                zarr.consolidate_metadata(self._store)
        except Exception as exc:
            # Storage trouble at the very end: the rows are written, only a convenience is not.
            return [
                f"streamspec: could not consolidate the metadata of {self._label} at close "
                f"({type(exc).__name__}: {exc}); streamspec.open() reads every written row, "
                "xarray.open_zarr needs consolidated=False"
            ]
        return []

    def _resume(
        self, existing: zarr.Group, chunk_steps: int, path: os.PathLike[str] | None
    ) -> zarr.Group:
        attrs = dict(existing.attrs)
        wanted = layout_attrs(self._layout)
        differences = [
            f"{key}: archive {attrs.get(key)!r}, layout {wanted[key]!r}"
            for key in RESUME_ATTRS
            if attrs.get(key) != wanted[key]
        ]
        # The optional variables (``tied=True``'s sigma_tied): a resume may add one (its past
        # rows are filled), never leave one out (its array would fall short of the other rows).
        # Archives older than the attribute have none.
        extras = [str(name) for name in cast(list[Any], attrs.get("extras", []))]
        if any(name not in wanted["extras"] for name in extras):
            differences.append(f"extras: archive {extras!r}, layout {wanted['extras']!r}")
        if differences:
            raise StreamspecError.build(
                expected=f"the archive at {self._label} to match the run's layout",
                got="; ".join(differences),
                fix="resume with the layout the archive was written with (it may add an "
                "optional variable such as tied=True, not drop one), or start a new path",
            )
        group = open_root(self._store, mode="r+")  # without the consolidated metadata ...
        committed_now = committed_rows(group)
        # ... so rewriting the root's zarr.json removes it, before any array changes shape.
        group.attrs.update({COMMIT_ATTRS[d]: n for d, n in committed_now.items()})
        before = int(cast(int, attrs.get("every", 1)))
        if before != wanted["every"]:
            # One attribute cannot hold both; it tells the latest session's (the step coordinate
            # shows which steps each session recorded).
            group.attrs.update({"every": wanted["every"]})
            warnings.warn(
                f"streamspec: {self._label} was recorded every {before} step(s); this session "
                f"records every {wanted['every']}: its `every` attribute now says "
                f"{wanted['every']} (the `step` coordinate shows which steps were recorded)",
                StreamspecWarning,
                stacklevel=outside_stacklevel(),
            )
        if path is not None:
            _remove_partial_files(path)
        with quiet_partial_files():
            present = set(group.array_keys())
        variables = row_variables(layout=self._layout)
        # Arrays a killed resume was adding: created again (their fill may be incomplete).
        unfinished = filling_arrays(existing)
        for name in unfinished:
            if name in present and name not in {v.name for v in variables}:
                del group[name]  # added by a resume that did not finish, and not wanted now
        # Variables newer than the archive (an optional one, or one a later version added).
        added = [v for v in variables if v.name not in present or v.name in unfinished]
        if added:
            group.attrs.update({FILLING_ATTR: [v.name for v in added]})
        for v in added:
            array = self._create_row_array(
                group, v, rows=committed_now[v.row_dim], chunk_steps=chunk_steps, overwrite=True
            )
            _fill(array, v.fill_value)  # every committed chunk exists, or check() sees damage
        for v in variables:
            if v in added:
                continue
            committed = committed_now[v.row_dim]
            array = member_array(group, v.name)
            if array.shape[0] < committed:
                raise StreamspecError.build(
                    expected=f"{v.name} with at least {committed} rows ({COMMIT_ATTRS[v.row_dim]})",
                    got=f"{array.shape[0]} rows in {self._label}",
                    fix="the archive is damaged; start a new path",
                )
            if array.shape[0] > committed:  # rows of a flush interrupted before its commit
                array.resize((committed, *array.shape[1:]))
        if added or unfinished or extras != wanted["extras"]:
            # Last: readers learn of the added variables once their past rows exist.
            finished = {k: v for k, v in group.attrs.asdict().items() if k != FILLING_ATTR}
            group.attrs.put({**finished, "extras": wanted["extras"]})
        return group


@contextlib.contextmanager
def _ignoring(*messages: str) -> Iterator[None]:
    """Ignore the UserWarnings matching ``messages`` meanwhile (background thread, at close).

    Warning filters are process-wide (Python 3.11), and a store call that close() gave up on
    returns whenever it does: this removes only its own filters then, where ``catch_warnings``
    would put back the filters (and ``showwarning``) of when the call began, undoing whatever
    the process set meanwhile.
    """
    added = []
    for message in messages:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
        added.append(warnings.filters[0])
    try:
        yield
    finally:
        filters = cast(list[Any], warnings.filters)  # a list (typed as a Sequence)
        for entry in added:
            with contextlib.suppress(ValueError):
                filters.remove(entry)
        mutated = getattr(warnings, "_filters_mutated", None)  # as filterwarnings does
        if mutated is not None:
            mutated()


def _not_writable(label: str, exc: OSError) -> StreamspecError:
    return StreamspecError.build(
        expected=f"a writable place for a new archive at {label}",
        got=f"{type(exc).__name__}: {exc}",
        fix="choose a path in a writable directory (no file of that name on its way)",
    )


# Archive directories this process holds the lock of (absolute path → lock).
_HELD: dict[str, _DirectoryLock] = {}
_HELD_LOCK = threading.Lock()


def _flock_or_wait(fd: int, key: str) -> None:
    """``flock`` the directory; if a writer of this process holds it and is closing (a monitor
    collected without close()), wait for it (at most :data:`_WRITE_TIMEOUT` seconds) first.

    Raises:
        BlockingIOError: held by another writer (still running, or another process).
    """
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        with _HELD_LOCK:
            holder = _HELD.get(key)
        if holder is None or not holder.closing or not holder.released.wait(_WRITE_TIMEOUT):
            raise
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class _DirectoryLock:
    """An exclusive advisory lock (``flock``) on a local archive's directory, held while its
    writer is open: a second writer of the same archive — another process resuming it while the
    first still writes (a job requeued too early), or a second monitor in this process — is
    refused instead of interleaving its rows with the first's. The operating system releases it
    when the holder exits, however it exits (``kill -9`` included), so a crashed run's archive
    resumes at once. Not taken where the platform or filesystem has no such locks (Windows, some
    network mounts): those writers are unguarded, as before."""

    def __init__(self, fd: int, path: Path, created: bool) -> None:
        self._fd: int | None = fd
        self._path, self._created = path, created
        self.closing = False  # its writer is closing: a new writer in this process waits
        self.released = threading.Event()

    @classmethod
    def acquire(cls, path: Path, label: str) -> _DirectoryLock | None:
        if importlib.util.find_spec("fcntl") is None:  # Windows
            return None
        if path.exists() and not path.is_dir():
            return None  # a file: find_archive says what it is
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise _not_writable(label, exc) from exc
        try:
            _flock_or_wait(fd, os.path.abspath(path))
        except BlockingIOError:
            os.close(fd)
            raise StreamspecError.build(
                expected=f"no other writer of the archive at {label}",
                got="another writer holding it (a run still writing there, in this process or "
                "another)",
                fix="close or stop that run first (a process that died releases it at once), or "
                "write to a new path",
            ) from None
        except OSError:  # no locks on this filesystem
            os.close(fd)
            return None
        lock = cls(fd, path, created)
        with _HELD_LOCK:
            _HELD[os.path.abspath(path)] = lock
        return lock

    def release(self, *, remove_if_empty: bool = False) -> None:
        """Unlock (idempotent); ``remove_if_empty``: also remove the directory if this writer
        created it and nothing was written (a refused or failed open leaves nothing behind)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        os.close(fd)
        with _HELD_LOCK:
            if _HELD.get(os.path.abspath(self._path)) is self:
                del _HELD[os.path.abspath(self._path)]
        self.released.set()
        if remove_if_empty and self._created:
            with contextlib.suppress(OSError):
                self._path.rmdir()  # only if empty


def _await_abandoned(key: str, label: str) -> None:
    """Before a writer touches a store: wait (at most :data:`_WRITE_TIMEOUT` seconds) for a hung
    store call that an earlier writer's close() gave up on, since it may still land (over the
    rows and commit counters the new writer writes).

    Raises:
        StreamspecError: if that call is still in flight.
    """
    with _ABANDONED_LOCK:
        thread = _ABANDONED.get(key)
    if thread is None:
        return
    thread.join(_WRITE_TIMEOUT)
    if thread.is_alive():
        raise StreamspecError.build(
            expected=f"no store call of an earlier writer in flight to {label}",
            got=f"one that has not returned for over {_WRITE_TIMEOUT:g} s (its close() gave up "
            "on it; it may still land, over what a new writer writes)",
            fix="open the writer once the store answers again, or write to a new path",
        )
    with _ABANDONED_LOCK:
        if _ABANDONED.get(key) is thread:
            del _ABANDONED[key]


def _remove_partial_files(root: os.PathLike[str]) -> None:
    """Delete the temporary files of atomic writes that a killed writer left under ``root``.

    Only a writer calls this, and only while it is the store's one writer (before it writes).
    """
    for directory, _, files in os.walk(root):
        for name in files:
            if _PARTIAL_FILE.search(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))


def _merged(blocks: list[_Block]) -> list[_Block]:
    """Consecutive blocks of one dimension as one (none was dropped in between): one write."""
    merged: list[_Block] = []
    for block in blocks:
        last = merged[-1] if merged else None
        if last is not None and last.row_dim == block.row_dim and last.seqs[1] + 1 == block.seqs[0]:
            rows = [*last.rows, *block.rows]
            merged[-1] = _Block(block.row_dim, rows, (last.seqs[0], block.seqs[1]), block.ticket)
        else:
            merged.append(block)
    return merged


def _rows_text(row_dim: str, spans: list[_LostSpan]) -> str:
    """``"5 step rows (steps 0..4, 9)"``, ``"1 epoch row (epoch 0)"``: lost rows, for messages."""
    rows = sum(span.rows for span in spans)
    ranges = [str(s.first) if s.first == s.last else f"{s.first}..{s.last}" for s in spans]
    shown = ", ".join(ranges[:5]) + (", …" if len(ranges) > 5 else "")
    plural = "" if rows == 1 else "s"
    return f"{rows} {row_dim} row{plural} ({row_dim}{plural} {shown})"


def _fill(array: zarr.Array, value: Any) -> None:
    """Write ``value`` to every row of ``array``, one chunk of rows at a time (bounded memory)."""
    rows = array.chunks[0]
    for start in range(0, array.shape[0], rows):
        array[start : start + rows] = value


def _stack(v: RowVariable, rows: list[dict[str, np.ndarray]], layout: RunLayout) -> np.ndarray:
    """Stack one variable over rows: ``[n_rows, *row_shape]``; absent optional rows are fill."""
    shape = v.row_shape(layout)
    return np.stack(
        [
            row[v.name] if v.name in row else np.full(shape, v.fill_value, dtype=v.dtype)
            for row in rows
        ]
    )


def _int_attr(value: Any) -> int:
    """An integer attribute, 0 when absent or not an integer (an archive from another tool)."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _next_index(array: zarr.Array, committed: int) -> int:
    """One past the last committed index in ``array`` (``step`` or ``epoch``), or 0."""
    return _last_value(array, committed) + 1 if committed else 0


def _last_value(array: zarr.Array, committed: int) -> int:
    """The last committed value of a 1-D index array, or -1 when nothing is committed."""
    return int(np.asarray(array[committed - 1])) if committed else -1
