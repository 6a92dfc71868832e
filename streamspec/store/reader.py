"""Read a streamspec archive, finished or live: committed rows only.

A writer publishes rows in three moves: grow the arrays, write the rows, then raise the commit
counters (group attributes ``committed_steps``/``committed_epochs``). A reader reads the counters
first and slices every variable to them, so it never sees a half-written row, even from another
process while the run goes on. Zarr array handles never see a new shape, so every read re-opens
the group.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import xarray as xr
import zarr
from xarray.backends import AbstractDataStore, ZarrStore
from zarr.abc.store import Store

from streamspec.errors import StreamspecError
from streamspec.layout import RunLayout
from streamspec.store.schema import (
    COMMIT_ATTRS,
    DATASET_ATTRS,
    ROW_DIMS,
    layout_from_attrs,
    missing_archive_parts,
)

StoreLike = str | os.PathLike[str] | Store


def resolve_store(store: StoreLike, *, read_only: bool) -> tuple[Store, str, Path | None]:
    """Turn what a user passed into a Zarr store.

    Args:
        store: A local path, an fsspec URL (``"memory://run.zarr"``, ``"s3://bucket/run.zarr"``;
            needs ``fsspec``), or a Zarr store object (used as is).
        read_only: Open paths and URLs read-only.

    Returns:
        ``(store, label, path)``: the store, a name for messages, and the local path (``None``
        unless ``store`` was a local path).
    """
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
        return fsspec_store, text, None
    path = Path(text.removeprefix("file://"))
    return zarr.storage.LocalStore(path, read_only=read_only), str(path), path


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


def find_archive(store: Store, label: str, path: Path | None) -> zarr.Group | None:
    """Open the streamspec archive in ``store`` read-only, if there is one.

    Returns:
        The archive's root group, or ``None`` if the store (or local path) holds nothing.

    Raises:
        StreamspecError: if the store holds something that is not a streamspec archive.
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
        group = zarr.open_group(store, mode="r")
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
    missing = missing_archive_parts(dict(group.attrs), names)
    if missing:
        raise _not_an_archive(
            label,
            f"a Zarr v{group.metadata.zarr_format} group lacking {', '.join(missing)}",
        )
    return group


def _not_an_archive(label: str, found: str) -> StreamspecError:
    return StreamspecError.build(
        expected=f"a streamspec archive (Zarr v3 group) at {label}",
        got=found,
        fix="pass the path a streamspec run wrote to, or a new path for a new archive",
    )


def open_archive(store: StoreLike) -> Archive:
    """Open a streamspec archive for reading (a finished run, or a live one to follow).

    Args:
        store: A local path, an fsspec URL, or a Zarr store object (e.g. the
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
        group = zarr.open_group(store, mode="r")
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.layers: tuple[str, ...] = _strings(group, "layer")
        self.groups: tuple[str, ...] = _strings(group, "group")
        self.kinds: tuple[str, ...] = _strings(group, "kind")
        self.pairs: tuple[str, ...] = _strings(group, "pair")
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

    def _group(self) -> zarr.Group:
        return zarr.open_group(self._store, mode="r")

    def _committed(self) -> dict[str, int]:
        return committed_rows(self._group())


def committed_rows(group: zarr.Group) -> dict[str, int]:
    """The commit counters of an archive's root group, per row dimension."""
    return {d: int(cast(int, group.attrs[COMMIT_ATTRS[d]])) for d in ROW_DIMS}


def member_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of ``group`` (a StreamspecError if it is a group)."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise StreamspecError.build(
            expected=f"{name!r} to be an array in a streamspec archive",
            got="a group",
            fix="open the archive a streamspec run wrote",
        )
    return node


def _strings(group: zarr.Group, name: str) -> tuple[str, ...]:
    return tuple(str(s) for s in np.asarray(member_array(group, name)[:]).tolist())


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
