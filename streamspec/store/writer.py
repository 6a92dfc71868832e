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
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import ZstdCodec
from zarr.core.array_spec import ArrayConfigParams

from streamspec._version import __version__
from streamspec.errors import StreamspecError
from streamspec.layout import RunLayout
from streamspec.store.reader import (
    Archive,
    EpochSteps,
    committed_rows,
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

# What LocalStore leaves behind when killed inside an atomic write: ``<name>.<uuid4 hex>.partial``.
_PARTIAL_FILE = re.compile(r"\.[0-9a-f]{32}\.partial$")


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
        flush_every: Buffered steps that trigger a background write.

    Raises:
        StreamspecError: if an archive exists and ``resume`` is False, if ``store`` holds
            something else, or if a resumed archive's layout differs from ``layout``.

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
        if store is None:
            self._store: Store = zarr.storage.MemoryStore()
            self._label = repr(self._store)
            existing = None
        else:
            self._store, self._label, path = resolve_store(store, read_only=False)
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

        self._committed = committed_rows(self._group)
        self._steps_before = self._committed["step"]  # committed by earlier sessions
        self._arrays = {
            v.name: member_array(self._group, v.name).with_config(_ARRAY_CONFIG)
            for v in row_variables(layout=self._layout)
        }
        self._start_step = _next_index(self._arrays["step"], self._committed["step"])
        self._start_epoch = _next_index(self._arrays["epoch"], self._committed["epoch"])
        # Bounds for the next rows (checked in the training thread, before buffering).
        self._last_step = self._start_step - 1
        self._last_epoch_row = self._start_epoch - 1
        self._last_step_epoch = _last_value(self._arrays["step_epoch"], self._committed["step"])

        self._buffer: list[dict[str, np.ndarray]] = []
        # Blocks handed over but not yet written, oldest first. The thread drains all of them at
        # once, merging consecutive blocks of one dimension: a store slower than training gets
        # fewer, larger writes instead of a growing queue of small ones.
        self._pending: list[tuple[str, list[dict[str, np.ndarray]]]] = []
        self._pending_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamspec-writer")
        self._last_future: Future[None] | None = None
        self._error: tuple[str, BaseException] | None = None
        self._error_raised = False
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
        """The first epoch this session may write: last committed ``epoch`` + 1, or 0."""
        return self._start_epoch

    @property
    def store(self) -> Store:
        """The Zarr store written to."""
        return self._store

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

        Raises:
            StreamspecError: if a background write failed (the first failure, chained); from
                then on nothing more is written, and every ``flush`` raises it again.
        """
        self._raise_failure(again=True)
        self._submit_steps()
        if wait and self._last_future is not None:
            self._last_future.result()
        self._raise_failure(again=True)

    def close(self) -> None:
        """Write everything buffered, wait, stop the thread, then consolidate the metadata.

        Consolidated metadata (the root ``zarr.json`` holding every array's metadata) lets
        ``xarray.open_zarr(path)`` and ``xarray.open_datatree(path, engine="zarr")`` read a finished
        archive with their defaults. It is written only when every row is, and a resumed writer
        removes it before growing any array. Calling ``close`` again does nothing.

        Raises:
            StreamspecError: if a background write failed and no earlier call reported it (the
                metadata is then left unconsolidated), or if consolidating failed.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._submit_steps()
        finally:
            self._executor.shutdown(wait=True)
        self._raise_failure(again=False)
        if self._error is None:
            self._consolidate()

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
        with self._pending_lock:
            self._pending.append((row_dim, rows))
        # The thread runs tasks in order: when this one is done, every block before it is written.
        self._last_future = self._executor.submit(self._drain)

    def _raise_failure(self, *, again: bool) -> None:
        if self._error is None or (self._error_raised and not again):
            return
        self._error_raised = True
        what, exc = self._error
        raise StreamspecError.build(
            expected=f"the background write of {what} to {self._label} to succeed",
            got=f"{type(exc).__name__}: {exc}",
            fix="make the store writable (space, permissions) and reopen it with "
            "resume=True; the rows after the last committed ones were not written",
        ) from exc

    # ------------------------------------------------------------------ background thread
    def _drain(self) -> None:
        """Write every pending block, in order (a no-op if an earlier task took them all)."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        merged: list[tuple[str, list[dict[str, np.ndarray]]]] = []
        for row_dim, rows in pending:
            if merged and merged[-1][0] == row_dim:
                merged[-1][1].extend(rows)
            else:
                merged.append((row_dim, list(rows)))
        for row_dim, rows in merged:
            self._write_rows(row_dim, rows)

    def _write_rows(self, row_dim: str, rows: list[dict[str, np.ndarray]]) -> None:
        """Grow each array of ``row_dim``, write the rows, then commit them (in that order)."""
        start = self._committed[row_dim]
        stop = start + len(rows)
        first = rows[0].get(row_dim)
        what = f"{len(rows)} {row_dim} row(s) from {row_dim} {first} (rows {start}..{stop - 1})"
        if self._error is not None:
            return  # after a failure, later rows would leave a gap: write nothing more
        try:
            variables = row_variables(row_dim, self._layout)
            blocks = {v.name: _stack(v, rows, self._layout) for v in variables}
            for v in variables:
                array = self._arrays[v.name]
                array.resize((stop, *array.shape[1:]))
            for v in variables:
                self._arrays[v.name][start:stop] = blocks[v.name]
            self._group.attrs.update({COMMIT_ATTRS[row_dim]: stop})
            self._committed[row_dim] = stop
        except Exception as exc:
            self._error = (what, exc)

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
        self, group: zarr.Group, v: RowVariable, *, rows: int, chunk_steps: int
    ) -> None:
        requested = chunk_steps if v.row_dim == "step" else EPOCH_CHUNK_ROWS
        row_shape = v.row_shape(self._layout)
        coords = [
            c.name for c in row_variables(v.row_dim, self._layout) if c.coordinate and c is not v
        ]
        group.create_array(
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
        )

    def _consolidate(self) -> None:
        if not self._store.supports_consolidated_metadata:
            return
        try:
            with warnings.catch_warnings(), quiet_partial_files():
                # "not part of the Zarr v3 specification": known, and readers never need it.
                warnings.filterwarnings(
                    "ignore", message="Consolidated metadata", category=UserWarning
                )
                zarr.consolidate_metadata(self._store)
        except Exception as exc:
            raise StreamspecError.build(
                expected=f"the metadata of {self._label} consolidated at close",
                got=f"{type(exc).__name__}: {exc}",
                fix="every row is written and streamspec.open() reads it; for xarray pass "
                "consolidated=False",
            ) from exc

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
        # The optional variables (``tied=True``'s sigma_tied) must match too: a resume without
        # them left theirs short of the other rows, and the archive unreadable.
        extras = attrs.get("extras", [])  # archives older than the attribute have none
        if extras != wanted["extras"]:
            differences.append(f"extras: archive {extras!r}, layout {wanted['extras']!r}")
        if differences:
            raise StreamspecError.build(
                expected=f"the archive at {self._label} to match the run's layout",
                got="; ".join(differences),
                fix="resume with the layout the archive was written with, or start a new path",
            )
        group = open_root(self._store, mode="r+")  # without the consolidated metadata ...
        committed_now = committed_rows(group)
        # ... so rewriting the root's zarr.json removes it, before any array changes shape.
        group.attrs.update({COMMIT_ATTRS[d]: n for d, n in committed_now.items()})
        if path is not None:
            _remove_partial_files(path)
        with quiet_partial_files():
            present = set(group.array_keys())
        for v in row_variables(layout=self._layout):
            committed = committed_now[v.row_dim]
            if v.name not in present:  # a variable newer than the archive: fill its past rows
                self._create_row_array(group, v, rows=committed, chunk_steps=chunk_steps)
                continue
            array = member_array(group, v.name)
            if array.shape[0] < committed:
                raise StreamspecError.build(
                    expected=f"{v.name} with at least {committed} rows ({COMMIT_ATTRS[v.row_dim]})",
                    got=f"{array.shape[0]} rows in {self._label}",
                    fix="the archive is damaged; start a new path",
                )
            if array.shape[0] > committed:  # rows of a flush interrupted before its commit
                array.resize((committed, *array.shape[1:]))
        return group


def _remove_partial_files(root: os.PathLike[str]) -> None:
    """Delete the temporary files of atomic writes that a killed writer left under ``root``.

    Only a writer calls this, and only while it is the store's one writer (before it writes).
    """
    for directory, _, files in os.walk(root):
        for name in files:
            if _PARTIAL_FILE.search(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))


def _stack(v: RowVariable, rows: list[dict[str, np.ndarray]], layout: RunLayout) -> np.ndarray:
    """Stack one variable over rows: ``[n_rows, *row_shape]``; absent optional rows are fill."""
    shape = v.row_shape(layout)
    return np.stack(
        [
            row[v.name] if v.name in row else np.full(shape, v.fill_value, dtype=v.dtype)
            for row in rows
        ]
    )


def _next_index(array: zarr.Array, committed: int) -> int:
    """One past the last committed index in ``array`` (``step`` or ``epoch``), or 0."""
    return _last_value(array, committed) + 1 if committed else 0


def _last_value(array: zarr.Array, committed: int) -> int:
    """The last committed value of a 1-D index array, or -1 when nothing is committed."""
    return int(np.asarray(array[committed - 1])) if committed else -1
