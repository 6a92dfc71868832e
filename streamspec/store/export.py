"""Export a run as one read-only ``.zip`` file: its committed rows, with consolidated metadata.

A Zarr ``ZipStore`` cannot replace a member (a rewrite adds a duplicate), so nothing here is
written twice: the metadata is assembled and consolidated in memory first, then every member is
written once, then the chunks are copied byte for byte (same codecs, nothing re-encoded).
"""

from __future__ import annotations

import itertools
import math
import os
import uuid
import warnings
from pathlib import Path

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from streamspec.errors import StreamspecError
from streamspec.store.reader import (
    StoreLike,
    committed_rows,
    member_array,
    open_archive,
    open_root,
    quiet_partial_files,
)
from streamspec.store.schema import COMMIT_ATTRS


def export_archive(source: StoreLike, destination: str | os.PathLike[str]) -> Path:
    """Write a single-file copy of a run: a Zarr ``ZipStore`` that ``streamspec.open`` reads.

    The copy holds the committed rows (a live or crashed run's rows past its commit counters are
    left out) and consolidated metadata, so ``xarray.open_zarr(zarr.storage.ZipStore(path))``
    reads it too. It is written under a temporary name in the destination's folder and renamed
    when complete.

    Args:
        source: The run: a path, an fsspec URL, a Zarr store object, or another export.
        destination: A new local path ending in ``.zip`` (missing parent folders are made).

    Returns:
        The path of the written ``.zip``.

    Raises:
        StreamspecError: if ``destination`` exists or does not end in ``.zip``, or ``source`` is
            not a streamspec archive.
    """
    out = Path(destination)
    if out.suffix.lower() != ".zip":
        raise StreamspecError.build(
            expected="a destination path ending in .zip (streamspec.open recognises it by that)",
            got=repr(str(out)),
            fix=f"pass e.g. {str(out.with_suffix('.zip'))!r}",
        )
    if out.exists():
        raise StreamspecError.build(
            expected=f"no file at {out} (an export never overwrites)",
            got="an existing file" if out.is_file() else "an existing directory",
            fix="choose a new destination or remove the old one",
        )
    archive = open_archive(source)  # raises StreamspecError if it is not an archive
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{uuid.uuid4().hex}.partial")
    try:
        _write_zip(archive.store, partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    open_archive(out)  # the copy opens
    return out


def _write_zip(source: Store, path: Path) -> None:
    group = open_root(source)
    committed = committed_rows(group)  # read before the arrays: every row below it is complete
    staging = zarr.storage.MemoryStore()
    zarr.create_group(
        staging,
        zarr_format=3,
        attributes={**dict(group.attrs), **{COMMIT_ATTRS[d]: n for d, n in committed.items()}},
    )
    prototype = default_buffer_prototype()
    chunk_keys: list[str] = []
    with quiet_partial_files():
        names = sorted(group.array_keys())
    for name in names:
        array = member_array(group, name)
        dims = getattr(array.metadata, "dimension_names", None) or ()
        shape = tuple(array.shape)
        if dims and dims[0] in committed:
            shape = (min(committed[dims[0]], shape[0]), *shape[1:])
        metadata = array.metadata.update_shape(shape)
        for key, buffer in metadata.to_buffer_dict(prototype).items():
            sync(staging.set(f"{name}/{key}", buffer))
        grid = [range(math.ceil(n / c)) for n, c in zip(shape, array.chunks, strict=True)]
        chunk_keys += [f"{name}/{metadata.encode_chunk_key(c)}" for c in itertools.product(*grid)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(staging)

    zip_store = zarr.storage.ZipStore(path, mode="w")
    try:
        for key in sync(_list(staging)):
            metadata_buffer = sync(staging.get(key, prototype))
            assert metadata_buffer is not None
            sync(zip_store.set(key, metadata_buffer))
        for key in chunk_keys:
            chunk = sync(source.get(key, prototype))
            if chunk is not None:  # never written: reads as the fill value in the copy too
                sync(zip_store.set(key, chunk))
    finally:
        zip_store.close()


async def _list(store: Store) -> list[str]:
    return sorted([key async for key in store.list()])
