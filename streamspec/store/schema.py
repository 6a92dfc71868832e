"""What a streamspec archive holds: one table of row variables, the coordinates and the attributes.

An archive is a Zarr v3 group. Variables that grow during a run have ``step`` or ``epoch`` as their
first dimension and are declared once, in :data:`ROW_VARIABLES`; the writer and the reader are
generic over that table, so a new variable (``sigma_err`` with the dimensions of ``sigma``,
``sigma_tied`` over ``(step, layer, group, rank)``) is one more line here.

Dimensions that do not grow (``layer``, ``kind``, ``group``, ``rank``, ``pair``) are fixed by the
:class:`~streamspec.layout.RunLayout` and stored as 1-D coordinate arrays named like their
dimension, so ``xarray.open_zarr`` turns them into coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from streamspec.layout import KINDS, RunLayout

# Dimensions along which an archive grows, one row per step / per epoch.
ROW_DIMS: tuple[str, ...] = ("step", "epoch")

# Group attribute holding, per row dimension, how many rows readers may trust. Written after the
# rows themselves, so a reader slicing to it never sees a half-written row.
COMMIT_ATTRS: dict[str, str] = {"step": "committed_steps", "epoch": "committed_epochs"}

# Group attribute of an archive being created: the writer creates the root group with only this,
# then its arrays, then replaces the attributes with the real ones. A process killed in between
# leaves a group readers refuse and writers re-create, instead of one that looks damaged.
CREATING_ATTR = "streamspec_creating"

# Group attribute naming the arrays a resumed writer is adding (variables newer than the archive),
# set before it creates them and removed once their past rows hold fill values. A writer killed
# meanwhile leaves them listed, with chunks missing: readers report an unfinished fill, not damage,
# and the next resume creates them again.
FILLING_ATTR = "streamspec_filling"

# Group attributes a resumed run must match (the rest may differ between sessions of one run).
RESUME_ATTRS: tuple[str, ...] = ("layers", "groups", "rank", "normalize")

# Group attributes kept on ``Archive.to_xarray()``; the commit counters and the layout lists
# (already coordinates) are left out because they describe the store, not the dataset.
DATASET_ATTRS: tuple[str, ...] = (
    "rank",
    "normalize",
    "every",
    "streamspec_version",
    "model",
    "created",
)

# Rows per chunk along ``epoch`` (epochs are rare; a partly filled chunk is rewritten per epoch).
EPOCH_CHUNK_ROWS = 16

# Upper bound on one uncompressed chunk: wide layouts get fewer rows per chunk than requested.
MAX_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class RowVariable:
    """One array that grows by one row per step or per epoch.

    Attributes:
        name: Array name in the archive (and variable name in xarray).
        dims: Dimension names; ``dims[0]`` is ``"step"`` or ``"epoch"``.
        dtype: NumPy dtype name of the stored values.
        keyword: If set, the writer fills this variable from the ``append_*`` keyword of that name
            (``step=…``, ``epoch=…``) instead of taking it from the row dict.
        coordinate: True for a non-dimension coordinate (xarray decodes it as a coordinate
            because the other variables over ``dims[0]`` list it in their ``coordinates``
            attribute).
        required: False if a row may leave the variable out (its row is then the fill value).
        optional: True if the archive holds the variable only when the run's layout asks for it
            (``name in layout.extras``, e.g. ``sigma_tied`` with ``watch(..., tied=True)``).
    """

    name: str
    dims: tuple[str, ...]
    dtype: str
    keyword: str | None = None
    coordinate: bool = False
    required: bool = True
    optional: bool = False

    @property
    def row_dim(self) -> str:
        """The growing dimension: ``"step"`` or ``"epoch"``."""
        return self.dims[0]

    @property
    def fill_value(self) -> Any:
        """NaN for floating variables, -1 for integer ones (never a valid count or index)."""
        return np.nan if np.dtype(self.dtype).kind == "f" else -1

    def row_shape(self, layout: RunLayout) -> tuple[int, ...]:
        """Shape of one row (all dimensions but the first) for ``layout``."""
        sizes = dim_sizes(layout)
        return tuple(sizes[d] for d in self.dims[1:])


_CELL = ("layer", "kind", "group", "rank")
_PAIR_CELL = ("layer", "kind", "pair", "rank")

ROW_VARIABLES: tuple[RowVariable, ...] = (
    # --- one row per recorded step ----------------------------------------------------------
    RowVariable("step", ("step",), "int64", keyword="step"),
    RowVariable("step_epoch", ("step",), "int64", keyword="epoch", coordinate=True),
    RowVariable("sigma", ("step", *_CELL), "float32"),
    # Error estimate of each recorded σ (same dims): 0 for exact spectra; see the README.
    RowVariable("sigma_err", ("step", *_CELL), "float32", required=False),
    RowVariable("count", ("step", "group"), "int64"),
    RowVariable(
        "sigma_tied", ("step", "layer", "group", "rank"), "float32", required=False, optional=True
    ),
    # --- one row per epoch ---------------------------------------------------------------------
    RowVariable("epoch", ("epoch",), "int64", keyword="epoch"),
    RowVariable("sigma_epoch", ("epoch", *_CELL), "float32"),
    # float64 keeps p-values far below float32's 1e-38 and t to full precision.
    RowVariable("welch_t", ("epoch", *_PAIR_CELL), "float64"),
    RowVariable("welch_p", ("epoch", *_PAIR_CELL), "float64"),
)
"""Every growing variable, in the order the writer writes them."""


def row_variables(
    row_dim: str | None = None, layout: RunLayout | None = None
) -> tuple[RowVariable, ...]:
    """The variables of :data:`ROW_VARIABLES` that grow along ``row_dim`` (all if ``None``);
    optional ones only when ``layout`` asks for them."""
    extras = layout.extras if layout is not None else ()
    return tuple(
        v
        for v in ROW_VARIABLES
        if (row_dim is None or v.row_dim == row_dim) and (not v.optional or v.name in extras)
    )


def row_inputs(row_dim: str, layout: RunLayout | None = None) -> tuple[RowVariable, ...]:
    """The variables a caller passes in a row dict (those not filled from a keyword)."""
    return tuple(v for v in row_variables(row_dim, layout) if v.keyword is None)


def dim_sizes(layout: RunLayout) -> dict[str, int]:
    """Sizes of the fixed dimensions for ``layout``."""
    return {
        "layer": len(layout.layers),
        "kind": len(KINDS),
        "group": len(layout.groups),
        "rank": layout.rank,
        "pair": len(layout.pairs),
    }


def dimension_coords(layout: RunLayout) -> dict[str, np.ndarray]:
    """Values of the fixed dimension coordinates: strings for names, ``0..k-1`` for ``rank``."""
    return {
        "layer": np.array(layout.layers, dtype=str),
        "kind": np.array(KINDS, dtype=str),
        "group": np.array(layout.groups, dtype=str),
        "rank": np.arange(layout.rank, dtype=np.int64),
        "pair": np.array(layout.pairs, dtype=str),
    }


def layout_attrs(layout: RunLayout) -> dict[str, Any]:
    """Group attributes that describe ``layout`` (JSON-serialisable)."""
    return {
        "rank": layout.rank,
        "normalize": layout.normalize,
        "every": layout.every,
        "model": layout.model,
        "layers": list(layout.layers),
        "groups": list(layout.groups),
        "extras": list(layout.extras),
    }


def layout_from_attrs(attrs: dict[str, Any]) -> RunLayout:
    """Rebuild the :class:`RunLayout` recorded in an archive's group attributes."""
    return RunLayout(
        layers=tuple(attrs["layers"]),
        groups=tuple(attrs["groups"]),
        rank=int(attrs["rank"]),
        normalize=str(attrs["normalize"]),
        every=int(attrs.get("every", 1)),
        model=str(attrs.get("model", "")),
        extras=tuple(attrs.get("extras", ())),
    )


def chunk_rows(variable: RowVariable, layout: RunLayout, requested: int) -> int:
    """Rows per chunk along ``variable.row_dim``: ``requested``, fewer if a chunk would be huge."""
    row_bytes = np.dtype(variable.dtype).itemsize * int(np.prod(variable.row_shape(layout)))
    return max(1, min(requested, MAX_CHUNK_BYTES // max(row_bytes, 1)))


def missing_archive_parts(attrs: dict[str, Any], names: set[str]) -> list[str]:
    """What an existing Zarr group lacks to be a streamspec archive (empty list if nothing).

    Args:
        attrs: The group's attributes.
        names: Names of the group's members.
    """
    needed_attrs = ("streamspec_version", *RESUME_ATTRS, *COMMIT_ATTRS.values())
    missing = [f"attribute {a!r}" for a in needed_attrs if a not in attrs]
    # Only the row indices: other variables may postdate the archive (the writer adds them on
    # resume, the reader skips them).
    missing += [f"array {d!r}" for d in ROW_DIMS if d not in names]
    return missing
