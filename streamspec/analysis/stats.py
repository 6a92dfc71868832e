"""Offline t-tests between groups of a recorded run, and their multiple-comparison correction.

The two tests of Baker, Calhoun & Plis (2024, AutoSpec), on the archived per-step σ:

1. :func:`across_ranks` — at each step, per layer and kind, a two-tailed Welch t-test between
   the k singular values of side a and the k singular values of side b (the singular-value
   *indices* are the samples): does the whole spectrum of a sit above b's at this step?
2. :func:`across_steps` — per singular-value index i, layer and kind, a two-tailed test between
   σ_i of a and σ_i of b over the recorded steps of a window (an epoch, a sliding block of
   steps, the whole run): ``method="welch"`` (Welch 1947; what the archive's ``welch_t``/
   ``welch_p`` hold per epoch and pair) or ``method="paired"`` (Student's paired t on the
   per-step differences).

Which to prefer. Both sides are measured at the same steps (one batch, one model state), so the
per-step differences d_s = σ_a(s) − σ_b(s) remove what the steps share (the learning-rate
schedule, the drift of the spectra over training) and the paired test has more power where that
shared drift is large. Welch treats the two sides' steps as independent samples and answers
"do the values differ on average over the window", robust to sides observed at different steps
(NaN holes, ``every``). Neither is an i.i.d. test: consecutive steps are autocorrelated (the same
weights, a slowly changing model), so their p-values are too small for the nominal level. Read
them as a monitoring signal; for a calibrated statement along steps, use the cluster permutation
test of :mod:`streamspec.analysis.clusters` with block sign flips.

Multiple comparisons: :func:`fdr` applies the Benjamini–Hochberg procedure (Benjamini &
Hochberg 1995, ``scipy.stats.false_discovery_control``) to a family of layers × ranks × time,
separately per kind and contrast.

References:
    J. Baker, V. D. Calhoun, S. M. Plis, "Spectral introspection identifies group training
    dynamics in deep neural networks for neuroimaging", 2024 (arXiv:2406.11825).
    B. L. Welch, Biometrika 34, 1947. Y. Benjamini, Y. Hochberg, JRSS-B 57, 1995.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike
from scipy import special
from scipy import stats as sps

from streamspec.analysis.data import (
    Contrast,
    contrast_sigma,
    epoch_windows,
    resolve_contrasts,
    run_window,
)
from streamspec.errors import StreamspecError
from streamspec.stats.welch import Welford, welch_t_test

__all__ = [
    "across_ranks",
    "across_steps",
    "fdr",
    "fdr_bh",
    "paired_t_test",
    "sides",
]

ContrastSpec = str | Sequence[Contrast | str]
TIME_DIMS: tuple[str, ...] = ("step", "epoch", "window")


def sides(ds: xr.Dataset, contrasts: ContrastSpec = "pairs", **pool: Any) -> xr.Dataset:
    """Both sides of every contrast per step (:func:`~streamspec.analysis.data.contrast_sigma`).

    Args:
        ds: A run's dataset, or a sides dataset already (returned as is).
        contrasts: A spec for :func:`~streamspec.analysis.data.resolve_contrasts`.
        **pool: ``by``/``sep``/``level`` for pooled contrasts.

    Returns:
        ``a``, ``b`` float64 ``[step, layer, kind, contrast, rank]``; ``count_a``, ``count_b``.
    """
    if "a" in ds and "b" in ds:
        return ds
    groups = [str(g) for g in ds["group"].values.tolist()]
    return contrast_sigma(ds, resolve_contrasts(groups, contrasts, **pool))


def paired_t_test(
    mean_d: ArrayLike, var_d: ArrayLike, n: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided paired (one-sample) t-test from the moments of the differences, vectorised.

    Follows ``scipy.stats.ttest_rel(a, b, nan_policy="omit")``: t = d̄ / (s_d/√n) with
    ν = n − 1; s_d = 0 gives t = ±inf, p = 0 (or NaN for d̄ = 0); n < 2 gives NaN.

    Args:
        mean_d: Means of the paired differences a − b, any shape.
        var_d: Their unbiased (``ddof=1``) variances.
        n: Pairs per cell (pairs with a NaN side omitted).

    Returns:
        ``(t, p)``, float64 arrays of the broadcast shape; t > 0 where a > b on average.
    """
    m, v, c = (np.asarray(x, dtype=np.float64) for x in (mean_d, var_d, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = m / np.sqrt(v / c)
    t = np.where(c < 2, np.nan, t)
    p = 2.0 * special.stdtr(np.maximum(c - 1, 1), -np.abs(t))
    return t, p


def across_ranks(
    ds: xr.Dataset,
    contrasts: ContrastSpec = "pairs",
    *,
    ranks: slice | Sequence[int] | None = None,
    **pool: Any,
) -> xr.Dataset:
    """Test 1: per step, Welch's t between the singular values of side a and of side b.

    At step s, layer ℓ and kind κ the samples are {σ_i^a(s)} and {σ_i^b(s)} over the indices i
    (NaN omitted, as ``scipy.stats.ttest_ind(equal_var=False, nan_policy="omit")`` along
    ``rank``). Large |t| says one side's whole spectrum is larger at this step.

    Args:
        ds: A run's dataset (or :func:`sides`).
        contrasts: Which sides to compare (see :func:`sides`).
        ranks: The singular-value indices to use (default: all k).
        **pool: ``by``/``sep``/``level`` for pooled contrasts.

    Returns:
        Dataset with ``t``, ``p`` float64 and ``n_a``, ``n_b`` int64 (values used), all
        ``[step, layer, kind, contrast]``.
    """
    sd = sides(ds, contrasts, **pool)
    if ranks is not None:
        sd = sd.isel(rank=ranks if isinstance(ranks, slice) else list(ranks))
    a = np.moveaxis(sd["a"].values, -1, 0)  # [rank, step, layer, kind, contrast]
    b = np.moveaxis(sd["b"].values, -1, 0)
    wa = Welford(a.shape[1:]).update_batch(a)
    wb = Welford(b.shape[1:]).update_batch(b)
    t, p = welch_t_test(wa.mean, wa.var, wa.n, wb.mean, wb.var, wb.n)
    dims = ("step", "layer", "kind", "contrast")
    coords = {d: sd[d] for d in dims}
    out = xr.Dataset(
        {"t": (dims, t), "p": (dims, p), "n_a": (dims, wa.n), "n_b": (dims, wb.n)}, coords=coords
    )
    if "step_epoch" in sd.coords:
        out = out.assign_coords(step_epoch=sd["step_epoch"])
    out.attrs["test"] = "welch across singular-value indices, per step"
    return out


def across_steps(
    ds: xr.Dataset,
    contrasts: ContrastSpec = "pairs",
    windows: str | xr.DataArray = "epoch",
    *,
    method: Literal["welch", "paired"] = "welch",
    **pool: Any,
) -> xr.Dataset:
    """Test 2: per singular-value index, side a against side b over the steps of each window.

    ``method="welch"``: ``scipy.stats.ttest_ind(a, b, equal_var=False, nan_policy="omit")``
    over the window's steps (for epoch windows and single-group sides this is the archive's
    ``welch_t``/``welch_p``). ``method="paired"``: ``scipy.stats.ttest_rel(a, b,
    nan_policy="omit")``, i.e. a one-sample t-test of d_s = σ_a(s) − σ_b(s) over the steps where
    both sides have a value. See the module docstring for which to prefer; steps are
    autocorrelated, so both are monitoring signals rather than i.i.d. tests.

    Args:
        ds: A run's dataset (or :func:`sides`).
        contrasts: Which sides to compare (see :func:`sides`).
        windows: ``"epoch"``, ``"run"``, or a boolean mask ``[window, step]`` from
            :func:`~streamspec.analysis.data.sliding_windows` (its first dimension and its
            coordinates name the result's time axis).
        method: ``"welch"`` or ``"paired"``.
        **pool: ``by``/``sep``/``level`` for pooled contrasts.

    Returns:
        Dataset with ``t``, ``p`` float64 and ``n_a``, ``n_b`` int64 (steps used per side; equal
        for ``paired``), ``[<window dim>, layer, kind, contrast, rank]``.

    Raises:
        StreamspecError: for an unknown ``windows`` or ``method``.
    """
    sd = sides(ds, contrasts, **pool)
    mask = _windows(sd, windows)
    if method not in ("welch", "paired"):
        raise StreamspecError.build(
            expected="method 'welch' or 'paired'", got=repr(method), fix="pick one of the two"
        )
    a = sd["a"].values  # [step, layer, kind, contrast, rank]
    b = sd["b"].values
    if method == "paired":
        diff = a - b  # NaN where either side is missing: the pair is omitted
    shape = a.shape[1:]
    keep = np.asarray(mask.values, dtype=bool)
    ts, ps, nas, nbs = [], [], [], []
    for rows in keep:  # one iteration per window; every cell at once
        if method == "welch":
            wa = Welford(shape).update_batch(a[rows])
            wb = Welford(shape).update_batch(b[rows])
            t, p = welch_t_test(wa.mean, wa.var, wa.n, wb.mean, wb.var, wb.n)
            na, nb = wa.n, wb.n
        else:
            wd = Welford(shape).update_batch(diff[rows])
            t, p = paired_t_test(wd.mean, wd.var, wd.n)
            na = nb = wd.n
        ts.append(t)
        ps.append(p)
        nas.append(na)
        nbs.append(nb)
    wdim = str(mask.dims[0])
    dims = (wdim, "layer", "kind", "contrast", "rank")
    coords = {d: sd[d] for d in dims[1:]}
    coords.update({str(name): c for name, c in mask.coords.items() if "step" not in c.dims})
    out = xr.Dataset(
        {
            "t": (dims, np.stack(ts) if ts else np.empty((0, *shape))),
            "p": (dims, np.stack(ps) if ps else np.empty((0, *shape))),
            "n_a": (dims, np.stack(nas) if nas else np.empty((0, *shape), dtype=np.int64)),
            "n_b": (dims, np.stack(nbs) if nbs else np.empty((0, *shape), dtype=np.int64)),
        },
        coords=coords,
    )
    out.attrs["test"] = f"{method} across steps, per singular-value index"
    return out


def _windows(sd: xr.Dataset, windows: str | xr.DataArray) -> xr.DataArray:
    if isinstance(windows, xr.DataArray):
        if (
            windows.ndim != 2
            or windows.dims[1] != "step"
            or windows.sizes["step"] != sd.sizes["step"]
        ):
            raise StreamspecError.build(
                expected=f"a boolean mask [window, step] with {sd.sizes['step']} steps",
                got=f"dims {windows.dims} and shape {windows.shape}",
                fix="build it with sliding_windows(ds, size, stride) on the same run",
            )
        return windows
    if windows == "epoch":
        return epoch_windows(sd)
    if windows == "run":
        return run_window(sd)
    raise StreamspecError.build(
        expected="windows 'epoch', 'run' or a mask from sliding_windows()",
        got=repr(windows),
        fix="e.g. across_steps(ds, windows=sliding_windows(ds, 50, 25))",
    )


def fdr_bh(p: ArrayLike, axis: int | Sequence[int] | None = None) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values), NaN kept as NaN.

    ``scipy.stats.false_discovery_control(method="bh")`` on the finite p-values of each family
    (it raises on NaN: untestable cells are left out of the family, not counted as p = 1).

    Args:
        p: p-values, any shape.
        axis: The axes that form one family; the other axes index separate families (looped
            over: there are few, e.g. kinds × contrasts). ``None``: all entries are one family.

    Returns:
        q-values, float64, the shape of ``p``; reject at FDR level α where ``q <= α``.
    """
    arr = np.asarray(p, dtype=np.float64)
    axes = tuple(range(arr.ndim)) if axis is None else np.atleast_1d(axis).tolist()
    axes = tuple(int(a) % max(arr.ndim, 1) for a in axes)
    rest = tuple(a for a in range(arr.ndim) if a not in axes)
    moved = np.transpose(arr, rest + axes)
    fam_shape = moved.shape[: len(rest)]
    flat = moved.reshape(int(np.prod(fam_shape, dtype=np.int64)), -1)
    q = np.full_like(flat, np.nan)
    for f in range(flat.shape[0]):
        ok = np.isfinite(flat[f])
        if ok.any():
            q[f, ok] = sps.false_discovery_control(flat[f, ok], method="bh")
    return np.transpose(q.reshape(moved.shape), np.argsort(rest + axes))


def fdr(p: xr.DataArray, over: Sequence[str] | None = None) -> xr.DataArray:
    """Benjamini–Hochberg q-values of a p-value array, one family per kind and contrast.

    Args:
        p: p-values, e.g. ``across_steps(...)["p"]`` ``[epoch, layer, kind, contrast, rank]`` or
            ``across_ranks(...)["p"]`` ``[step, layer, kind, contrast]``.
        over: The dimensions of one family. Default: time (``step``/``epoch``/``window``) ×
            ``layer`` × ``rank``, those present.

    Returns:
        q-values with the dims and coords of ``p``.
    """
    family = (
        [d for d in p.dims if d in (*TIME_DIMS, "layer", "rank")] if over is None else list(over)
    )
    unknown = [d for d in family if d not in p.dims]
    if unknown:
        raise StreamspecError.build(
            expected=f"family dimensions among {list(p.dims)}",
            got=str(unknown),
            fix="name dimensions of the p-value array",
        )
    axes = [p.dims.index(d) for d in family]
    q = p.copy(data=fdr_bh(p.values, axis=axes))
    q.name = "q"
    q.attrs["fdr_family"] = ",".join(map(str, family))
    return q
