"""Offline inputs: open a run, pick layers and groups, build group contrasts and step windows.

Every analysis function takes the dataset of :meth:`streamspec.Archive.to_xarray` (``sigma``
``[step, layer, kind, group, rank]``, ``count`` ``[step, group]``, ...). This module turns what a
user names (runs, layers, groups, "SZ vs HC") into that dataset's indices, and says clearly what
was expected when a name does not exist.

A *contrast* compares side a with side b; each side is one group or several groups pooled. A
pooled side's σ at a step is the count-weighted mean of its member groups' σ (see
:func:`pooled_sigma`). A *window* is a set of recorded steps tested together: one epoch, a sliding
block of steps, or the whole run.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import xarray as xr

from streamspec.errors import StreamspecError
from streamspec.layout import pair_labels

__all__ = [
    "Contrast",
    "contrast_sigma",
    "epoch_windows",
    "load",
    "one_vs_rest",
    "pairs",
    "pool",
    "pooled_pairs",
    "pooled_sigma",
    "resolve_contrasts",
    "run_window",
    "select",
    "sliding_windows",
]

RunLike = str | os.PathLike[str] | xr.Dataset | Any  # Any: a streamspec Archive


def load(run: RunLike) -> xr.Dataset:
    """Read a run's committed rows into memory.

    Args:
        run: An archive path or URL, an :class:`~streamspec.Archive`, or a dataset already read
            (returned as is).

    Returns:
        The dataset of ``Archive.to_xarray()``, loaded (``sigma`` ``[step, layer, kind, group,
        rank]``, ``count`` ``[step, group]``, ``sigma_epoch``, ``welch_t``, ``welch_p``).

    Raises:
        StreamspecError: if ``run`` is not an archive, if ``Archive.check()`` (where the store
            provides it) reports damage, or if its chunks cannot be read (a corrupt archive).
    """
    if isinstance(run, xr.Dataset):
        return run
    from streamspec.store.reader import Archive, open_archive

    archive = run if isinstance(run, Archive) else open_archive(run)
    label = getattr(archive, "_label", str(run))
    check = getattr(archive, "check", None)
    if callable(check):
        problems = check()
        if isinstance(problems, list | tuple) and problems:
            raise _corrupt(label, "; ".join(str(p) for p in problems))
    try:
        ds = archive.to_xarray().load()
    except StreamspecError:
        raise
    except Exception as exc:  # zarr/codec/OS errors on damaged chunks or metadata
        raise _corrupt(label, f"{type(exc).__name__}: {exc}") from exc
    missing = [v for v in ("sigma", "count") if v not in ds]
    if missing:
        raise _corrupt(label, f"no variable {', '.join(missing)}")
    return ds


def _corrupt(label: str, what: str) -> StreamspecError:
    return StreamspecError.build(
        expected=f"a readable streamspec archive at {label}",
        got=f"a damaged archive ({what})",
        fix="re-copy or re-export the run; `streamspec info RUN` shows what is committed",
    )


def _match(what: str, names: Sequence[str], wanted: Iterable[str]) -> list[str]:
    """Names in ``names`` matching ``wanted`` (exact names or fnmatch patterns), in run order."""
    chosen: set[str] = set()
    for w in wanted:
        hits = [n for n in names if n == w or fnmatch.fnmatchcase(n, w)]
        if not hits:
            raise StreamspecError.build(
                expected=f"a {what} of the run (one of {', '.join(map(repr, names))})",
                got=repr(w),
                fix=f"pick {what} names from `streamspec info RUN` (glob patterns work, e.g. "
                f"'{names[0] if names else '*'}*')",
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


def select(
    ds: xr.Dataset,
    *,
    layers: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
) -> xr.Dataset:
    """Keep some layers, groups and kinds of a run (names or glob patterns, in run order).

    Pairs (``welch_t``/``welch_p``) are kept where both of their groups are kept.

    Args:
        ds: A run's dataset.
        layers: Layer names or patterns (``"encoder.*"``); ``None`` keeps all.
        groups: Group names or patterns; ``None`` keeps all.
        kinds: Among ``activation``, ``adjoint``, ``gradient``; ``None`` keeps all.

    Raises:
        StreamspecError: naming what exists, if a name or pattern matches nothing.
    """
    index: dict[str, list[str]] = {}
    if layers is not None:
        index["layer"] = _match("layer", _coord(ds, "layer"), layers)
    if kinds is not None:
        index["kind"] = _match("kind", _coord(ds, "kind"), kinds)
    if groups is not None:
        all_groups = _coord(ds, "group")
        kept = _match("group", all_groups, groups)
        index["group"] = kept
        if "pair" in ds.dims:
            index["pair"] = list(pair_labels(tuple(kept)))
    return ds.sel(index)


def _coord(ds: xr.Dataset, name: str) -> list[str]:
    return [str(v) for v in ds[name].values.tolist()]


# --------------------------------------------------------------------------- contrasts
@dataclass(frozen=True)
class Contrast:
    """Side a against side b; each side one group or several pooled.

    Attributes:
        a: Group names of side a.
        b: Group names of side b (disjoint from ``a``).
        label_a: Name of side a (the group, or the pool's name).
        label_b: Name of side b.
    """

    a: tuple[str, ...]
    b: tuple[str, ...]
    label_a: str
    label_b: str

    @property
    def name(self) -> str:
        """``"<label_a> vs <label_b>"``, like the archive's ``pair`` labels."""
        return f"{self.label_a} vs {self.label_b}"

    @classmethod
    def of(
        cls,
        a: str | Sequence[str],
        b: str | Sequence[str],
        *,
        label_a: str | None = None,
        label_b: str | None = None,
    ) -> Contrast:
        """A contrast from group names (a list pools its groups; labels join names with "+")."""
        sa = (a,) if isinstance(a, str) else tuple(a)
        sb = (b,) if isinstance(b, str) else tuple(b)
        return cls(sa, sb, label_a or "+".join(sa), label_b or "+".join(sb))


def pairs(groups: Sequence[str]) -> list[Contrast]:
    """Every unordered pair of groups, in the archive's ``pair`` order."""
    return [Contrast.of(a, b) for a, b in combinations(groups, 2)]


def one_vs_rest(groups: Sequence[str]) -> list[Contrast]:
    """Each group against all the others pooled (label ``"rest"``)."""
    return [
        Contrast.of(g, [h for h in groups if h != g], label_b="rest")
        for g in groups
        if len(groups) > 1
    ]


def pool(
    groups: Sequence[str],
    *,
    by: Mapping[str, str] | None = None,
    sep: str = "/",
    level: int = 0,
) -> dict[str, tuple[str, ...]]:
    """Pool groups into larger ones, by a mapping or by a part of their names.

    With ``by``: group → pool name (groups absent from it are left out). Otherwise the pool of
    ``"SZ/F"`` is its ``level``-th ``sep``-separated part: ``"SZ"`` for ``level=0``, ``"F"`` for
    ``level=1``.

    Returns:
        Pool name → member groups, in run order.

    Raises:
        StreamspecError: if ``by`` names unknown groups, or a name has no part ``level``.
    """
    out: dict[str, list[str]] = {}
    if by is not None:
        unknown = sorted(set(by) - set(groups))
        if unknown:
            raise StreamspecError.build(
                expected=f"a mapping from groups of the run ({', '.join(groups)}) to pool names",
                got=f"unknown groups {unknown}",
                fix="use the run's group names as keys",
            )
        for g in groups:
            if g in by:
                out.setdefault(by[g], []).append(g)
        return {k: tuple(v) for k, v in out.items()}
    for g in groups:
        parts = g.split(sep)
        if not -len(parts) <= level < len(parts):
            raise StreamspecError.build(
                expected=f"group names with a part {level} when split at {sep!r}",
                got=repr(g),
                fix="pass another sep/level, or a mapping `by={group: pool}`",
            )
        out.setdefault(parts[level], []).append(g)
    return {k: tuple(v) for k, v in out.items()}


def pooled_pairs(
    groups: Sequence[str],
    *,
    by: Mapping[str, str] | None = None,
    sep: str = "/",
    level: int = 0,
) -> list[Contrast]:
    """Every pair of pools of :func:`pool` (e.g. all ``SZ/*`` against all ``HC/*``)."""
    pools = pool(groups, by=by, sep=sep, level=level)
    return [Contrast(pools[a], pools[b], a, b) for a, b in combinations(pools, 2)]


def resolve_contrasts(
    groups: Sequence[str],
    spec: str | Sequence[Contrast | str] = "pairs",
    *,
    by: Mapping[str, str] | None = None,
    sep: str = "/",
    level: int = 0,
) -> list[Contrast]:
    """Contrasts from a short spec.

    Args:
        groups: The run's groups.
        spec: ``"pairs"``, ``"one-vs-rest"``, ``"pooled"`` (uses ``by``/``sep``/``level``), or a
            list of :class:`Contrast` and ``"a vs b"`` strings (a side may pool groups with
            ``+``: ``"SZ/F+SZ/M vs HC/F+HC/M"``).

    Raises:
        StreamspecError: for an unknown spec or group, or sides that overlap.
    """
    if isinstance(spec, str):
        if spec == "pairs":
            out = pairs(groups)
        elif spec in ("one-vs-rest", "rest"):
            out = one_vs_rest(groups)
        elif spec in ("pooled", "pool"):
            out = pooled_pairs(groups, by=by, sep=sep, level=level)
        elif " vs " in spec:
            return resolve_contrasts(groups, [spec])
        else:
            raise StreamspecError.build(
                expected="'pairs', 'one-vs-rest', 'pooled' or a list of contrasts",
                got=repr(spec),
                fix="e.g. resolve_contrasts(groups, ['SZ vs HC'])",
            )
    else:
        out = []
        for c in spec:
            if isinstance(c, Contrast):
                out.append(c)
                continue
            sides = str(c).split(" vs ")
            if len(sides) != 2:
                raise StreamspecError.build(
                    expected="a contrast written 'a vs b' (pool groups with '+')",
                    got=repr(c),
                    fix="e.g. 'SZ/F+SZ/M vs HC/F+HC/M'",
                )
            out.append(Contrast.of(sides[0].split("+"), sides[1].split("+")))
    for c in out:
        _check_contrast(c, groups)
    if not out:
        raise StreamspecError.build(
            expected="at least one contrast (two groups or pools)",
            got=f"none from spec {spec!r} and groups {list(groups)}",
            fix="keep at least two groups, or pass contrasts explicitly",
        )
    return out


def _check_contrast(c: Contrast, groups: Sequence[str]) -> None:
    unknown = [g for g in (*c.a, *c.b) if g not in groups]
    if unknown:
        raise StreamspecError.build(
            expected=f"groups of the run ({', '.join(map(repr, groups))})",
            got=f"unknown group(s) {unknown} in contrast {c.name!r}",
            fix="name groups as `streamspec info RUN` lists them",
        )
    if not c.a or not c.b or set(c.a) & set(c.b):
        raise StreamspecError.build(
            expected="two non-empty, disjoint sides",
            got=f"{list(c.a)} vs {list(c.b)}",
            fix="put every group on one side only",
        )


def pooled_sigma(ds: xr.Dataset, members: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """σ of a pool of groups per step: the count-weighted mean of its members' σ.

    At step s, for each ``[layer, kind, rank]`` cell,
    σ_pool = Σ_g n_{s,g} σ_{s,g} / Σ_g n_{s,g}, over members g with ``count`` n > 0 and a finite
    σ (a member absent from the step, or past its rank bound, is left out). With one member this
    is the member's σ exactly. This is a summary of the members' spectra, not the spectrum of
    their stacked rows (which the per-group σ cannot give); groups that are larger at a step
    weigh more, as they would in a pooled batch.

    Args:
        ds: A run's dataset.
        members: Groups of the pool.

    Returns:
        ``(sigma, count)``: float64 ``[step, layer, kind, rank]`` (NaN where no member has a
        value) and int64 ``[step]``, the pool's samples per step.
    """
    sigma = ds["sigma"].sel(group=list(members)).transpose("step", "layer", "kind", "group", "rank")
    s = np.asarray(sigma.values, dtype=np.float64)
    n = np.asarray(ds["count"].sel(group=list(members)).transpose("step", "group").values)
    if len(members) == 1:
        return s[:, :, :, 0], n[:, 0].astype(np.int64)
    w = n.astype(np.float64)[:, None, None, :, None]
    ok = np.isfinite(s) & (w > 0)
    num = np.where(ok, w * np.where(ok, s, 0.0), 0.0).sum(axis=3)
    den = np.where(ok, w, 0.0).sum(axis=3)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / den, np.nan)
    return out, n.sum(axis=1).astype(np.int64)


def contrast_sigma(ds: xr.Dataset, contrasts: Sequence[Contrast]) -> xr.Dataset:
    """Both sides of every contrast, per step.

    Args:
        ds: A run's dataset.
        contrasts: From :func:`resolve_contrasts`.

    Returns:
        Dataset with ``a``, ``b`` float64 ``[step, layer, kind, contrast, rank]`` (see
        :func:`pooled_sigma`) and ``count_a``, ``count_b`` int64 ``[step, contrast]``; the
        ``step``/``step_epoch`` coordinates of ``ds``.
    """
    sides: dict[str, list[np.ndarray]] = {"a": [], "b": [], "count_a": [], "count_b": []}
    for c in contrasts:  # one entry per contrast; each is vectorised over all cells
        for side, members in (("a", c.a), ("b", c.b)):
            s, n = pooled_sigma(ds, members)
            sides[side].append(s)
            sides[f"count_{side}"].append(n)
    coords = {
        "step": ds["step"].values,
        "layer": ds["layer"].values,
        "kind": ds["kind"].values,
        "contrast": np.array([c.name for c in contrasts], dtype=str),
        "rank": ds["rank"].values,
    }
    out = xr.Dataset(
        {
            "a": (("step", "layer", "kind", "contrast", "rank"), np.stack(sides["a"], axis=3)),
            "b": (("step", "layer", "kind", "contrast", "rank"), np.stack(sides["b"], axis=3)),
            "count_a": (("step", "contrast"), np.stack(sides["count_a"], axis=1)),
            "count_b": (("step", "contrast"), np.stack(sides["count_b"], axis=1)),
        },
        coords=coords,
    )
    if "step_epoch" in ds.coords:
        out = out.assign_coords(step_epoch=("step", ds["step_epoch"].values))
    return out


# --------------------------------------------------------------------------- windows
def epoch_windows(ds: xr.Dataset) -> xr.DataArray:
    """One window per epoch: the recorded steps of that epoch.

    Returns:
        Boolean mask ``[epoch, step]`` (coordinate ``epoch``: the epochs that have steps).
    """
    step_epoch = np.asarray(ds["step_epoch"].values)
    epochs = np.unique(step_epoch)
    mask = step_epoch[None, :] == epochs[:, None]
    return xr.DataArray(
        mask, dims=("epoch", "step"), coords={"epoch": epochs, "step": ds["step"].values}
    )


def sliding_windows(ds: xr.Dataset, size: int, stride: int | None = None) -> xr.DataArray:
    """Windows of ``size`` consecutive recorded steps, starting every ``stride`` recorded steps.

    Sizes count recorded steps (rows), not training steps: with ``every=10``, ``size=5`` spans
    50 training steps. Only full windows are kept.

    Args:
        ds: A run's dataset.
        size: Recorded steps per window (≥ 2).
        stride: Recorded steps between window starts; default ``size`` (no overlap).

    Returns:
        Boolean mask ``[window, step]`` with coordinates ``window`` (0, 1, …), ``window_start``,
        ``window_stop`` (first and last ``step`` of each window) and ``window_center``.

    Raises:
        StreamspecError: if ``size`` < 2, ``stride`` < 1 or the run has fewer than ``size`` steps.
    """
    n = ds.sizes["step"]
    stride = size if stride is None else stride
    if size < 2 or stride < 1 or size > n:
        raise StreamspecError.build(
            expected=f"2 <= size <= {n} (recorded steps) and stride >= 1",
            got=f"size={size}, stride={stride}",
            fix="pick a window no longer than the run",
        )
    starts = np.arange(0, n - size + 1, stride)
    pos = np.arange(n)
    mask = (pos[None, :] >= starts[:, None]) & (pos[None, :] < starts[:, None] + size)
    steps = np.asarray(ds["step"].values)
    return xr.DataArray(
        mask,
        dims=("window", "step"),
        coords={
            "window": np.arange(len(starts)),
            "step": steps,
            "window_start": ("window", steps[starts]),
            "window_stop": ("window", steps[starts + size - 1]),
            "window_center": ("window", (steps[starts] + steps[starts + size - 1]) / 2),
        },
    )


def run_window(ds: xr.Dataset) -> xr.DataArray:
    """One window holding every recorded step: ``[window=1, step]`` (window label ``"run"``)."""
    return xr.DataArray(
        np.ones((1, ds.sizes["step"]), dtype=bool),
        dims=("window", "step"),
        coords={"window": ["run"], "step": ds["step"].values},
    )
