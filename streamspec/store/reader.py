"""Read a streamspec archive, finished or live: committed rows only.

A writer publishes rows in three moves: grow the arrays, write the rows, then raise the commit
counters (group attributes ``committed_steps``/``committed_epochs``). A reader reads the counters
first and slices every variable to them, so it never sees a half-written row, even from another
process while the run goes on. Zarr array handles never see a new shape, so every read re-opens
the group, and never through consolidated metadata: a finished run's writer consolidates at
``close()``, but a resumed run grows the arrays again, and the only metadata that is never stale
is each array's own ``zarr.json``.

Archives are local directories, fsspec URLs, Zarr store objects, or read-only ``.zip`` files
written by :func:`streamspec.store.export_archive`.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import xarray as xr
import zarr
from xarray.backends import AbstractDataStore, ZarrStore
from zarr.abc.store import Store
from zarr.core.sync import sync

from streamspec.errors import StreamspecError, StreamspecWarning
from streamspec.layout import RunLayout
from streamspec.store.schema import (
    COMMIT_ATTRS,
    CREATING_ATTR,
    DATASET_ATTRS,
    FILLING_ATTR,
    ROW_DIMS,
    layout_from_attrs,
    missing_archive_parts,
)

StoreLike = str | os.PathLike[str] | Store


def resolve_store(store: StoreLike, *, read_only: bool) -> tuple[Store, str, Path | None]:
    """Turn what a user passed into a Zarr store.

    Args:
        store: A local path, an fsspec URL (``"memory://run.zarr"``, ``"s3://bucket/run.zarr"``;
            needs ``fsspec``), a local ``.zip`` file (an export; read-only), or a Zarr store
            object (used as is).
        read_only: Open paths and URLs read-only.

    Returns:
        ``(store, label, path)``: the store, a name for messages, and the local path (``None``
        unless ``store`` was a local directory path).

    Raises:
        StreamspecError: for something that is not a store, a URL without fsspec, a ``.zip``
            opened for writing, or a ``.zip`` path that is missing or not a zip file.
    """
    if isinstance(store, zarr.storage.ZipStore) and not read_only:
        _zip_store(Path(store.path), read_only=False)  # raises: a zip is written once, in export
    if isinstance(store, Store):
        return store, repr(store), None
    if not isinstance(store, str | os.PathLike):
        raise StreamspecError.build(
            expected="a path, an fsspec URL or a zarr store object",
            got=f"{type(store).__name__} {store!r}",
            fix="pass e.g. 'runs/exp1.zarr' or zarr.storage.MemoryStore()",
        )
    text = os.fspath(store)
    if "://" in text and not text.startswith("file://"):
        try:
            fsspec_store = zarr.storage.FsspecStore.from_url(text, read_only=read_only)
        except ImportError as exc:
            raise StreamspecError.build(
                expected="fsspec installed to open a URL",
                got=f"{text!r} and {exc}",
                fix="`pip install fsspec` (plus s3fs/gcsfs for cloud URLs) or pass a local path",
            ) from exc
        except ValueError as exc:  # fsspec: "Protocol not known"
            raise StreamspecError.build(
                expected="a URL whose protocol fsspec knows (memory://, s3://, gs://, …)",
                got=f"{text!r}: {exc}",
                fix="check the URL's scheme (and install its fsspec backend), or pass a path",
            ) from exc
        return fsspec_store, text, None
    path = Path(text.removeprefix("file://"))
    if path.suffix.lower() == ".zip":
        return _zip_store(path, read_only=read_only), str(path), None
    return zarr.storage.LocalStore(path, read_only=read_only), str(path), path


def _zip_store(path: Path, *, read_only: bool) -> Store:
    """A read-only store over an exported ``.zip`` archive."""
    if not read_only:
        raise StreamspecError.build(
            expected="a directory or URL to write an archive to",
            got=f"{str(path)!r}, a .zip path (zip archives are read-only exports)",
            fix="write to a .zarr directory; make a .zip of a finished run with "
            "streamspec.store.export_archive(run, out_zip)",
        )
    if not path.exists():
        raise StreamspecError.build(
            expected=f"a streamspec archive (Zarr v3 group) at {path}",
            got="nothing there",
            fix="check the path of the exported .zip",
        )
    if not zipfile.is_zipfile(path):
        raise _not_an_archive(str(path), "a file that is not a zip file")
    return zarr.storage.ZipStore(path, mode="r", read_only=True)


@contextmanager
def quiet_partial_files() -> Iterator[None]:
    """Silence zarr's warning about a live writer's temporary files while listing a group.

    A local store writes ``zarr.json`` atomically through a ``zarr.<hex>.partial`` file; a reader
    listing the group at that moment gets a ZarrUserWarning for it (an error under ``-W error``).
    Warning filters are process-wide in Python 3.11, so this also covers zarr's I/O thread.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Object at .*\.partial is not recognized", category=UserWarning
        )
        yield


def find_archive(
    store: Store, label: str, path: Path | None, *, incomplete_ok: bool = False
) -> zarr.Group | None:
    """Open the streamspec archive in ``store`` read-only, if there is one.

    Args:
        store: The store to look in.
        label: Its name, for messages.
        path: Its local directory, if it is one (a missing or empty directory holds nothing).
        incomplete_ok: Return the group of an archive whose creation was interrupted (see
            :func:`is_incomplete`) instead of refusing it; a writer re-creates such an archive.

    Returns:
        The archive's root group, or ``None`` if the store (or local path) holds nothing.

    Raises:
        StreamspecError: if the store holds something that is not a streamspec archive, or
            (unless ``incomplete_ok``) an archive whose creation was interrupted.
    """
    if path is not None:
        if not path.exists():
            return None
        if not path.is_dir():
            raise _not_an_archive(label, "a file, not a directory")
        entries = sorted(os.listdir(path))
        if not entries:
            return None
    try:
        group = open_root(store)
        with quiet_partial_files():
            names = set(group.keys())
    except zarr.errors.GroupNotFoundError:
        if path is None:
            return None  # an empty store object
        shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
        raise _not_an_archive(
            label, f"a directory that is not a Zarr group (holding {shown})"
        ) from None
    except zarr.errors.ContainsArrayError:
        raise _not_an_archive(label, "a Zarr array, not a group") from None
    if is_incomplete(group):
        if incomplete_ok:
            return group
        raise _not_an_archive(
            label,
            "an archive whose creation was interrupted (its process stopped before the first "
            "step; nothing was recorded)",
            fix="start the run again with this path: the writer replaces it",
        )
    missing = missing_archive_parts(dict(group.attrs), names)
    if missing:
        raise _not_an_archive(
            label,
            f"a Zarr v{group.metadata.zarr_format} group lacking {', '.join(missing)}",
        )
    return group


def is_incomplete(group: zarr.Group) -> bool:
    """True for an archive whose writer stopped while creating it (arrays not all there).

    The writer creates the root group with only the :data:`CREATING_ATTR` marker and replaces
    the attributes with the real ones once every array exists.
    """
    attrs = group.attrs
    return CREATING_ATTR in attrs and "streamspec_version" not in attrs


def open_root(store: Store, *, mode: str = "r") -> zarr.Group:
    """The root group, ignoring consolidated metadata (the one source that can be stale)."""
    return zarr.open_group(store, mode=mode, use_consolidated=False)  # type: ignore[arg-type]


def _not_an_archive(label: str, found: str, fix: str | None = None) -> StreamspecError:
    return StreamspecError.build(
        expected=f"a streamspec archive (Zarr v3 group) at {label}",
        got=found,
        fix=fix or "pass the path a streamspec run wrote to, or a new path for a new archive",
    )


def open_archive(store: StoreLike) -> Archive:
    """Open a streamspec archive for reading (a finished run, or a live one to follow).

    Args:
        store: A local path, an fsspec URL, a ``.zip`` written by
            :func:`~streamspec.store.export_archive`, or a Zarr store object (e.g. the
            ``zarr.storage.MemoryStore`` a writer used).

    Raises:
        StreamspecError: if nothing is there, or what is there is not a streamspec archive.
    """
    zstore, label, path = resolve_store(store, read_only=True)
    if find_archive(zstore, label, path) is None:
        raise StreamspecError.build(
            expected=f"a streamspec archive (Zarr v3 group) at {label}",
            got="nothing there" if path is None or not path.exists() else "an empty directory",
            fix="check the path; a run creates its archive when its writer starts",
        )
    return Archive(zstore, label)


class Archive:
    """Read access to a streamspec archive; counts and data follow a live run.

    Build with :func:`open_archive` (or ``ArchiveWriter.archive()``). The layout fields are read
    once; :attr:`n_steps`, :attr:`n_epochs` and :meth:`to_xarray` re-read the store on each call.

    Attributes:
        layers: Layer names, the ``layer`` coordinate.
        groups: Group names, the ``group`` coordinate.
        kinds: ``("activation", "adjoint", "gradient")``, the ``kind`` coordinate.
        pairs: ``"<a> vs <b>"`` labels, the ``pair`` coordinate.
        rank: Singular values kept per cell (size of ``rank``).
        normalize: How Gram matrices were normalised (``"mean"`` or ``"sum"``).
        every: A step was recorded every ``every`` training steps.
        attrs: All group attributes, as read when the archive was opened.
    """

    def __init__(self, store: Store, label: str) -> None:
        self._store = store
        self._label = label
        group = open_root(store)
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.layers: tuple[str, ...] = self._strings(group, "layer")
        self.groups: tuple[str, ...] = self._strings(group, "group")
        self.kinds: tuple[str, ...] = self._strings(group, "kind")
        self.pairs: tuple[str, ...] = self._strings(group, "pair")
        self.rank = int(self.attrs["rank"])
        self.normalize = str(self.attrs["normalize"])
        self.every = int(self.attrs.get("every", 1))

    def __repr__(self) -> str:
        return (
            f"Archive({self._label}: {self.n_steps} steps, {self.n_epochs} epochs, "
            f"{len(self.layers)} layers, groups={list(self.groups)}, rank={self.rank})"
        )

    @property
    def layout(self) -> RunLayout:
        """The :class:`RunLayout` the archive was written with."""
        return layout_from_attrs(self.attrs)

    @property
    def n_steps(self) -> int:
        """Committed rows along ``step`` (re-read from the store)."""
        return self._committed()["step"]

    @property
    def n_epochs(self) -> int:
        """Committed rows along ``epoch`` (re-read from the store)."""
        return self._committed()["epoch"]

    def to_xarray(self) -> xr.Dataset:
        """The committed rows as a lazily loaded dataset.

        Equivalent to ``xarray.open_zarr(store, consolidated=False).isel(step=slice(0,
        n_steps), epoch=slice(0, n_epochs))``, except that every variable is cut to the
        committed rows *before* xarray aligns them: ``open_zarr`` refuses an archive whose arrays
        have different lengths along ``step``, which is what a reader sees for a few
        milliseconds during each flush, and for good after a writer crashed mid-flush.

        Returns:
            Data variables ``sigma`` ``[step, layer, kind, group, rank]``, ``count``
            ``[step, group]``, ``sigma_epoch`` ``[epoch, layer, kind, group, rank]``, ``welch_t``
            and ``welch_p`` ``[epoch, layer, kind, pair, rank]`` (float64); coordinates ``step``,
            ``step_epoch`` (over ``step``), ``epoch``, ``layer``, ``kind``, ``group``, ``rank``,
            ``pair``; attributes ``rank``, ``normalize``, ``every``, ``streamspec_version``,
            ``model``, ``created``. String coordinates are plain NumPy ``str`` arrays (Zarr gives
            ``StringDType``, which e.g. ``.astype(str)`` and netCDF export reject).
            A variable a resume is still adding reads as NaN (-1 for integers) in the rows not
            filled yet, as it will once filled (see :meth:`check`).
        """
        committed = self._committed()  # before the data: rows below it are complete
        with quiet_partial_files():  # xarray lists the members (and reads them) here
            rows = _CommittedRows(
                ZarrStore.open_group(self._store, mode="r", consolidated=False, zarr_format=3),
                committed,
            )
            ds = xr.open_dataset(rows, engine="store")
        strings = {
            name: np.array(coord.values.tolist(), dtype=str)
            for name, coord in ds.coords.items()
            if coord.dtype.kind in "TO"
        }
        ds = ds.assign_coords(strings)
        ds.attrs = {k: ds.attrs[k] for k in DATASET_ATTRS if k in ds.attrs}
        return ds

    @property
    def store(self) -> Store:
        """The Zarr store read from."""
        return self._store

    def epoch_steps(self, epoch: int) -> EpochSteps:
        """The committed step rows of one epoch (those whose ``step_epoch`` is ``epoch``).

        A resumed run feeds them to its Welch accumulator: the statistics of an epoch that a
        crash interrupted then cover its steps from before the crash too.

        Args:
            epoch: The epoch, e.g. ``ArchiveWriter.start_epoch`` (the unfinished one).

        Returns:
            An :class:`EpochSteps`; empty (``n_steps == 0``) if no committed step belongs to it.
        """
        return read_epoch_steps(self._group(), self._committed()["step"], epoch)

    def check(self) -> None:
        """Verify that every committed chunk of every array is there and decodes.

        Reads (and decompresses) the whole archive once: the time it takes is that of reading
        every committed row. Chunks hold a zstd checksum, so a changed byte is found too. Also
        checks that ``step`` and ``epoch`` increase and ``step_epoch`` never decreases.

        An array a resume is adding (a variable newer than the archive, whose past rows it fills
        with NaN / -1 before training goes on) is not damaged while its fill is unfinished, or
        after a resume was killed during it: its missing chunks read as the fill value, and the
        next resume (or writer opened on the archive) fills it anew. That is warned about, not
        raised.

        Raises:
            StreamspecError: naming the first array and chunk key (``sigma/c/3/0/0/0/0``) that is
                missing or does not decode, and the rows it holds.

        Warns:
            StreamspecWarning: naming the arrays whose fill is unfinished.
        """
        group = self._group()
        committed = committed_rows(group)
        with quiet_partial_files():
            names = sorted(group.array_keys())
        # The fill mark read after the listing: an array listed was created after its mark was
        # set, and a mark gone by now means its fill is done (every chunk written).
        filling = {name for name in filling_arrays(self._group()) if name in names}
        unfilled = dict.fromkeys(sorted(filling), 0)
        for name in names:
            array = member_array(group, name)
            dims = getattr(array.metadata, "dimension_names", None) or ()
            row_dim = dims[0] if dims and dims[0] in committed else None
            rows = committed[row_dim] if row_dim is not None else array.shape[0]
            if array.shape[0] < rows:
                raise self._damaged(
                    name, f"{array.shape[0]} rows, fewer than the {rows} committed {row_dim}s"
                )
            shape = (rows, *array.shape[1:]) if array.ndim else ()
            grid = [range(math.ceil(n / c)) for n, c in zip(shape, array.chunks, strict=True)]
            for coords in itertools.product(*grid):
                key = f"{name}/{array.metadata.encode_chunk_key(coords)}"
                where = _chunk_rows(array, coords, row_dim)
                if not sync(self._store.exists(key)):
                    if name in filling:
                        unfilled[name] += 1
                        continue
                    raise self._damaged(name, f"chunk {key!r}{where} missing")
                try:
                    array.get_block_selection(coords)
                except Exception as exc:
                    raise self._damaged(
                        name, f"chunk {key!r}{where} that does not decode ({exc})"
                    ) from exc
        self._check_indices(group, committed)
        if unfilled:
            counts = ", ".join(
                f"{name!r} ({n} chunks not filled yet)" for name, n in unfilled.items()
            )
            warnings.warn(
                f"streamspec: {self._label} is not damaged, but a resume has not finished adding "
                f"{counts}: it is filling their past rows, or was stopped while doing so. Until "
                "then the unfilled rows read as NaN (-1 for integers), as they will once filled; "
                "the next resume of the run (streamspec.watch(..., resume=True) or "
                "ArchiveWriter(..., resume=True)) finishes the fill",
                StreamspecWarning,
                stacklevel=2,
            )

    def _check_indices(self, group: zarr.Group, committed: dict[str, int]) -> None:
        for name, row_dim, strict in (
            ("step", "step", True),
            ("epoch", "epoch", True),
            ("step_epoch", "step", False),
        ):
            values = np.asarray(member_array(group, name)[: committed[row_dim]])
            steps = np.diff(values)
            bad = np.flatnonzero(steps <= 0 if strict else steps < 0)
            if bad.size:
                i = int(bad[0])
                order = "increasing" if strict else "non-decreasing"
                raise self._damaged(
                    name,
                    f"{values[i]} then {values[i + 1]} at rows {i}, {i + 1}",
                    expected=f"the committed values of array {name!r} in {self._label} {order}",
                )

    def _strings(self, group: zarr.Group, name: str) -> tuple[str, ...]:
        array = member_array(group, name)
        try:
            values = np.asarray(array[:])
        except Exception as exc:  # a coordinate is one chunk
            key = f"{name}/{array.metadata.encode_chunk_key((0,))}"
            raise self._damaged(name, f"chunk {key!r} that does not decode ({exc})") from exc
        return tuple(str(s) for s in values.tolist())

    def _damaged(self, name: str, got: str, expected: str | None = None) -> StreamspecError:
        return StreamspecError.build(
            expected=expected
            or f"every committed chunk of array {name!r} in {self._label} present and decodable",
            got=got,
            fix="the archive is damaged: restore it from a copy; to_xarray() still reads the "
            "other chunks (a missing one reads as NaN / -1)",
        )

    def _group(self) -> zarr.Group:
        return open_root(self._store)

    def _committed(self) -> dict[str, int]:
        return committed_rows(self._group())


@dataclass(frozen=True)
class EpochSteps:
    """The committed step rows of one epoch, read back from an archive.

    Attributes:
        epoch: The epoch.
        step: ``[n]`` int64, the steps' indices.
        sigma: ``[n, layer, kind, group, rank]`` float32, as archived (NaN kept).
        count: ``[n, group]`` int64, samples of each group in each step.
    """

    epoch: int
    step: np.ndarray
    sigma: np.ndarray
    count: np.ndarray

    @property
    def n_steps(self) -> int:
        """How many steps of the epoch are committed."""
        return int(self.step.shape[0])


def read_epoch_steps(group: zarr.Group, committed_steps: int, epoch: int) -> EpochSteps:
    """The rows among the first ``committed_steps`` whose ``step_epoch`` is ``epoch``."""
    step_epoch = np.asarray(member_array(group, "step_epoch")[:committed_steps])
    # step_epoch never decreases: the epoch's steps are one contiguous block.
    start, stop = (int(i) for i in np.searchsorted(step_epoch, [epoch, epoch + 1], side="left"))
    return EpochSteps(
        epoch=int(epoch),
        step=np.asarray(member_array(group, "step")[start:stop], dtype=np.int64),
        sigma=np.asarray(member_array(group, "sigma")[start:stop], dtype=np.float32),
        count=np.asarray(member_array(group, "count")[start:stop], dtype=np.int64),
    )


def _chunk_rows(array: zarr.Array, coords: tuple[int, ...], row_dim: str | None) -> str:
    """`` (steps 256..511)``: the rows a chunk holds, for messages (empty for fixed arrays)."""
    if row_dim is None:
        return ""
    size = array.chunks[0]
    return f" ({row_dim} rows {coords[0] * size}..{(coords[0] + 1) * size - 1})"


def filling_arrays(group: zarr.Group) -> list[str]:
    """The arrays a resume is adding and has not finished filling (:data:`FILLING_ATTR`); a
    resume killed meanwhile leaves them there, for the next one to create and fill again."""
    return [str(name) for name in cast(list[Any], group.attrs.get(FILLING_ATTR, []))]


def committed_rows(group: zarr.Group) -> dict[str, int]:
    """The commit counters of an archive's root group, per row dimension."""
    return {d: int(cast(int, group.attrs[COMMIT_ATTRS[d]])) for d in ROW_DIMS}


def member_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of ``group`` (a StreamspecError if it is missing or a group)."""
    try:
        node = group[name]
    except KeyError:
        raise StreamspecError.build(
            expected=f"array {name!r} in a streamspec archive",
            got="no such array (a damaged archive, or a Zarr group another program wrote)",
            fix="open an archive a streamspec run wrote (this one lost it: restore it from a copy)",
        ) from None
    if not isinstance(node, zarr.Array):
        raise StreamspecError.build(
            expected=f"{name!r} to be an array in a streamspec archive",
            got="a group",
            fix="open the archive a streamspec run wrote",
        )
    return node


class _CommittedRows(AbstractDataStore):
    """A Zarr data store whose variables are cut to the committed rows along ``step``/``epoch``.

    Cutting happens on xarray's lazy variables (no data is read), before any alignment.
    """

    def __init__(self, inner: ZarrStore, committed: dict[str, int]) -> None:
        self._inner = inner
        self._committed = committed

    def load(self) -> tuple[dict[str, xr.Variable], dict[str, Any]]:
        variables, attrs = self._inner.load()
        cut = {
            name: var.isel({var.dims[0]: slice(0, self._committed[var.dims[0]])})
            if var.dims and var.dims[0] in self._committed
            else var
            for name, var in variables.items()
        }
        return cut, dict(attrs)

    def get_encoding(self) -> dict[str, Any]:
        return self._inner.get_encoding()

    def close(self) -> None:
        self._inner.close()
