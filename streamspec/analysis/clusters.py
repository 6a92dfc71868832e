"""Cluster-based permutation test along steps (Maris & Oostenveld 2007), by sign flips.

Both groups are observed at the same steps, so each step gives a paired difference per cell,
d_s = σ_a(s) − σ_b(s) (cells: layer × kind × contrast × rank). Under the null hypothesis that
the group labels are exchangeable within a step, swapping them at step s flips the sign of d_s;
the test therefore builds its null distribution from random sign flips of the steps.

1. Statistic per step, over the ``window`` recorded steps centred on s (NaN omitted):
   ``statistic="z"``, the self-normalised moving sum z_s = Σd / √(Σd²) = √n·d̄ / rms(d), a
   monotone function of the moving paired t bounded by √n, with mean 0 and variance 1 under
   sign flips; or ``statistic="t"``, the moving paired t, t_s = d̄ / (s_d / √n). With
   ``window=1`` the input itself is the statistic (pass e.g. the per-step t of
   :func:`~streamspec.analysis.stats.across_ranks`, which also flips sign when the labels of a
   step are swapped).
2. Clusters: maximal runs of consecutive steps with t_s > c (positive clusters) or t_s < −c
   (negative clusters); the cluster-forming threshold c defaults to the two-sided 5% quantile of
   Student's t with ``window − 1`` degrees of freedom (1.96 for z). Cluster mass = Σ |t_s|.
3. Null: for each of ``n_permutations`` random sign patterns (the same pattern for every cell,
   so the dependence between cells is kept), the largest cluster mass of each cell, then the
   largest over each *family* of cells (one cell, or e.g. all layers × kinds × ranks of a
   contrast). A cluster's p is (1 + #{null max ≥ its mass}) / (1 + n_permutations) (Phipson &
   Smyth 2010), which controls the family-wise error over the family's clusters.

Which statistic (default ``"z"``). Both are valid: the null is built from the statistic
itself. They differ in power where the null maximum runs over many cells. t has heavy tails when
a window holds few values (df = n − 1): tail singular values are NaN past a group's rank bound,
so windows of 2–3 values are common there, and their chance t of 30+ dominate the null's
largest cluster mass. z is bounded by √n, so such windows cannot. Measured on the digits
classifier (10 epochs, 290 steps, contrast "0+1 vs 2+3", family = all 144 layer × kind × rank
cells, 500 sign patterns): t gave no cluster with p < 0.5 (observed and null masses of 200–450
from 2-value windows at σ₉); z found the adjoint σ₁ of the last layer (steps 39–81) and others at
p = 0.002–0.012. On one cell of white noise with a 0.8 σ shift over 40 of 300 steps (window 9,
60 runs) the two are alike: detected in 67% (t) and 70% (z) of runs, false clusters ≤ 2%.

Steps are autocorrelated. Flipping each step independently breaks that correlation and makes
null clusters shorter than the data's own under the null, i.e. anti-conservative p-values; flip
*blocks* of consecutive steps (``block`` ≥ the autocorrelation length, e.g. an epoch's steps or
a few dozen) to keep it.

The null loop (permutations × cells × steps × window) is the one place where a JIT pays: with
numba installed (``pip install streamspec[fast]``) it runs compiled, else a vectorised numpy
version runs in batches of permutations. Both give the same numbers for the same seed.

References:
    E. Maris, R. Oostenveld, "Nonparametric statistical testing of EEG- and MEG-data",
    J. Neurosci. Methods 164, 2007.
    B. Phipson, G. K. Smyth, "Permutation p-values should never be zero", Stat. Appl. Genet.
    Mol. Biol. 9, 2010.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike
from scipy import stats as sps

from streamspec.analysis.stats import ContrastSpec, sides
from streamspec.errors import StreamspecError

try:  # optional: `pip install streamspec[fast]`
    import numba
except ImportError:  # pragma: no cover - exercised where numba is missing
    numba = None  # type: ignore[assignment]

__all__ = [
    "ClusterTest",
    "cluster_permutation_test",
    "cluster_test",
    "moving_statistic",
    "numba_available",
    "sign_flips",
]

Backend = Literal["auto", "numba", "numpy"]
Statistic = Literal["t", "z"]

# Elements of the [batch, cells, steps, window] block the numpy route builds per batch.
_NUMPY_BLOCK = 4_000_000


def numba_available() -> bool:
    """Whether the compiled null loop can run (numba importable)."""
    return numba is not None


@dataclass
class ClusterTest:
    """Result of :func:`cluster_permutation_test` on ``[step, *cells]`` data.

    Attributes:
        statistic: The per-step statistic (t or z), float64 ``[step, *cells]``.
        cluster_p: p of the cluster each step belongs to, NaN outside clusters, ``[step, *cells]``.
        cluster_id: Index into the cluster arrays below for each step, −1 outside clusters.
        cell: Cell of each cluster, int64 ``[n_clusters, len(cells)]``.
        start: First step (position along ``step``) of each cluster, ``[n_clusters]``.
        stop: One past its last step.
        sign: +1 (side a larger) or −1.
        mass: Σ |t| over the cluster.
        p: Permutation p of each cluster.
        null: Largest cluster mass per permutation and family, ``[n_permutations, n_families]``.
        threshold: Cluster-forming threshold c on |t|.
        window: Steps in the moving statistic (1: the input is the statistic).
        statistic_name: ``"t"`` or ``"z"``.
        backend: ``"numba"`` or ``"numpy"``.
    """

    statistic: np.ndarray
    cluster_p: np.ndarray
    cluster_id: np.ndarray
    cell: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    sign: np.ndarray
    mass: np.ndarray
    p: np.ndarray
    null: np.ndarray
    threshold: float
    window: int
    statistic_name: str
    backend: str
    extra: dict[str, Any] = field(default_factory=dict)

    def significant(self, alpha: float = 0.05) -> np.ndarray:
        """Steps inside a cluster with p ≤ ``alpha``, bool ``[step, *cells]``."""
        return np.nan_to_num(self.cluster_p, nan=np.inf) <= alpha


# --------------------------------------------------------------------------- numpy route
# A window's variance below this fraction of its mean square counts as zero (t = ±inf): the
# one-pass formula below leaves rounding residue where every value in the window is equal.
_ZERO_VAR = 1e-12


def _window_parts(d: np.ndarray, window: int) -> tuple[np.ndarray, ...]:
    """What the moving t needs besides the signs: flip-invariant, computed once.

    Args:
        d: ``[cells, step]`` with NaN.
        window: Odd number of steps.

    Returns:
        ``(d0, lo, hi, n, q)``: ``d`` with NaN set to 0; each step's window bounds ``[lo, hi)``
        ``[step]``; finite values ``n`` and the sum of squares ``q`` per window ``[cells, step]``.
    """
    half = window // 2
    n_steps = d.shape[-1]
    pos = np.arange(n_steps)
    lo = np.maximum(pos - half, 0)
    hi = np.minimum(pos + half + 1, n_steps)
    ok = np.isfinite(d)
    d0 = np.where(ok, d, 0.0)
    zero = np.zeros((*d.shape[:-1], 1))
    c_n = np.concatenate([zero, np.cumsum(ok, axis=-1, dtype=np.float64)], axis=-1)
    c_q = np.concatenate([zero, np.cumsum(d0 * d0, axis=-1)], axis=-1)
    n = c_n[..., hi] - c_n[..., lo]
    q = c_q[..., hi] - c_q[..., lo]
    return d0, lo, hi, n, q


def _from_sums(statistic: str, total: np.ndarray, n: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The statistic from a window's sum, count and sum of squares (signs squared away).

    ``"t"``: t = mean/(sd/√n); ``"z"``: z = Σx/√(Σx²).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        if statistic == "z":
            return np.where((n >= 1) & (q > 0), total / np.sqrt(q), np.nan)
        mean = total / n
        var = (q - n * mean * mean) / (n - 1)
        var = np.where(var <= q * _ZERO_VAR, 0.0, var)
        t = mean / np.sqrt(var / n)
    return np.where(n >= 2, t, np.nan)


def moving_statistic(x: ArrayLike, window: int, statistic: str = "t") -> np.ndarray:
    """Moving one-sample statistic over ``window`` steps centred on each step (last axis).

    Windows are cut at the ends of the run. Sums are cumulative-sum differences, and the
    variance is (Σx² − n·x̄²)/(n − 1): Σx² does not change under sign flips, so the permutation
    loop only recomputes Σx.

    Args:
        x: Paired differences ``[..., step]``; NaN omitted.
        window: Odd number of steps (1: ``x`` is returned as float64).
        statistic: ``"t"``: the one-sample t, x̄ / (s/√n) (NaN where n < 2; ±inf where s = 0
            and x̄ ≠ 0; NaN where both are 0). ``"z"``: the self-normalised sum Σx / √(Σx²)
            = √n·x̄ / rms(x), a monotone function of t (t = z·√((n−1)/(n−z²))) that is bounded
            by √n; under sign flips it has mean 0 and variance 1 exactly.

    Returns:
        The statistic per step, float64 ``[..., step]``.
    """
    x = np.asarray(x, dtype=np.float64)
    if window == 1:
        return x
    d0, lo, hi, n, q = _window_parts(x, window)
    zero = np.zeros((*x.shape[:-1], 1))
    c_s = np.concatenate([zero, np.cumsum(d0, axis=-1)], axis=-1)
    return _from_sums(statistic, c_s[..., hi] - c_s[..., lo], n, q)


def _labels(t: np.ndarray, threshold: float) -> np.ndarray:
    """+1 / −1 / 0 per step: above c, below −c, or neither (NaN: neither)."""
    return (t > threshold).astype(np.int8) - (t < -threshold).astype(np.int8)


def _runs(t: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    """Clusters of each row of ``t`` ``[rows, step]``: (row, start, stop, sign, mass, id map)."""
    rows, n_steps = t.shape
    lab = _labels(t, threshold)
    prev = np.concatenate([np.zeros((rows, 1), np.int8), lab[:, :-1]], axis=1)
    begins = (lab != 0) & (lab != prev)
    on = lab.ravel() != 0
    ids = np.cumsum(begins.ravel()) - 1
    n_clusters = int(begins.sum())
    mass = np.bincount(ids[on], weights=np.abs(t).ravel()[on], minlength=n_clusters)
    size = np.bincount(ids[on], minlength=n_clusters)
    flat_begin = np.flatnonzero(begins.ravel())
    row, start = np.divmod(flat_begin, n_steps)
    sign = lab.ravel()[flat_begin].astype(np.int64)
    id_map = np.where(on, ids, -1).reshape(rows, n_steps)
    return row, start, start + size, sign, mass, id_map


def _null_max_numpy(
    d: np.ndarray, flips: np.ndarray, window: int, threshold: float, statistic: str = "t"
) -> np.ndarray:
    """Largest cluster mass per permutation and cell, ``[P, C]``, vectorised over cells."""
    n_perm, n_steps = flips.shape
    n_cells = d.shape[0]
    out = np.zeros((n_perm, n_cells))
    if window > 1:
        d0, lo, hi, n, q = _window_parts(d, window)
    batch = max(1, _NUMPY_BLOCK // max(1, n_cells * n_steps))
    for first in range(0, n_perm, batch):  # batches of permutations, every cell at once
        f = flips[first : first + batch, None, :]
        if window == 1:
            t = f * d[None]
        else:
            c_s = np.concatenate(
                [np.zeros((f.shape[0], n_cells, 1)), np.cumsum(f * d0[None], axis=-1)], axis=-1
            )
            t = _from_sums(statistic, c_s[..., hi] - c_s[..., lo], n[None], q[None])
        row, _, _, _, mass, _ = _runs(t.reshape(-1, n_steps), threshold)
        best = np.zeros(f.shape[0] * n_cells)
        np.maximum.at(best, row, mass)
        out[first : first + f.shape[0]] = best.reshape(f.shape[0], n_cells)
    return out


# --------------------------------------------------------------------------- numba route
def _null_max_loops(d0, lo, hi, n, q, flips, mode, threshold, zero_var, out):
    """Compiled by numba (``prange`` over permutations); the arithmetic of the numpy route."""
    n_perm, n_steps = flips.shape
    n_cells = d0.shape[0]
    for p in numba.prange(n_perm):
        c_s = np.zeros(n_steps + 1)
        for c in range(n_cells):
            for s in range(n_steps):
                c_s[s + 1] = c_s[s] + flips[p, s] * d0[c, s]
            best = 0.0
            current = 0.0
            current_sign = 0
            for s in range(n_steps):
                if mode == 0:
                    val = flips[p, s] * d0[c, s]  # d0 keeps NaN on this route
                elif mode == 2:
                    total = c_s[hi[s]] - c_s[lo[s]]
                    ok = n[c, s] >= 1 and q[c, s] > 0.0
                    val = total / math.sqrt(q[c, s]) if ok else np.nan
                else:
                    k = n[c, s]
                    if k < 2:
                        val = np.nan
                    else:
                        mean = (c_s[hi[s]] - c_s[lo[s]]) / k
                        var = (q[c, s] - k * mean * mean) / (k - 1)
                        if var <= q[c, s] * zero_var:
                            var = 0.0
                        se = math.sqrt(var / k)
                        if se > 0.0:
                            val = mean / se
                        elif mean > 0.0:
                            val = np.inf
                        elif mean < 0.0:
                            val = -np.inf
                        else:
                            val = np.nan
                if val > threshold:
                    sign = 1
                elif val < -threshold:
                    sign = -1
                else:
                    sign = 0
                if sign != current_sign:
                    if current > best:
                        best = current
                    current = 0.0
                    current_sign = sign
                if sign != 0:
                    current += abs(val)
            if current > best:
                best = current
            out[p, c] = best


_compiled: list[Callable[..., None]] = []


def _numba_kernel() -> Callable[..., None]:
    if not _compiled:  # compile once per process, on first use (one to two seconds)
        _compiled.append(numba.njit(parallel=True, cache=False)(_null_max_loops))
    return _compiled[0]


def _null_max_numba(
    d: np.ndarray, flips: np.ndarray, window: int, threshold: float, statistic: str = "t"
) -> np.ndarray:
    out = np.zeros((flips.shape[0], d.shape[0]))
    flips = np.ascontiguousarray(flips, dtype=np.float64)
    if window == 1:
        d = np.ascontiguousarray(d, dtype=np.float64)
        zeros = np.zeros(d.shape[-1], dtype=np.int64)
        _numba_kernel()(d, zeros, zeros, d, d, flips, 0, float(threshold), _ZERO_VAR, out)
        return out
    d0, lo, hi, n, q = _window_parts(d, window)
    _numba_kernel()(
        np.ascontiguousarray(d0),
        lo.astype(np.int64),
        hi.astype(np.int64),
        np.ascontiguousarray(n),
        np.ascontiguousarray(q),
        flips,
        2 if statistic == "z" else 1,
        float(threshold),
        _ZERO_VAR,
        out,
    )
    return out


# --------------------------------------------------------------------------- the test
def sign_flips(n_steps: int, n_permutations: int, *, block: int = 1, seed: int = 0) -> np.ndarray:
    """Random ±1 per step and permutation, constant over blocks of ``block`` consecutive steps.

    Returns:
        float64 ``[n_permutations, n_steps]`` (seeded: ``numpy.random.default_rng(seed)``).
    """
    rng = np.random.default_rng(seed)
    n_blocks = -(-n_steps // block)
    signs = rng.integers(0, 2, size=(n_permutations, n_blocks)).astype(np.float64) * 2.0 - 1.0
    return np.repeat(signs, block, axis=1)[:, :n_steps]


def cluster_permutation_test(
    d: ArrayLike,
    *,
    window: int = 9,
    statistic: Statistic = "z",
    threshold: float | None = None,
    n_permutations: int = 1000,
    block: int = 1,
    families: ArrayLike | None = None,
    seed: int = 0,
    backend: Backend = "auto",
) -> ClusterTest:
    """Cluster-based sign-flip permutation test along the first axis (steps).

    Args:
        d: Per-step paired differences (or, with ``window=1``, a per-step statistic that flips
            sign with the labels), ``[step, *cells]``; NaN allowed.
        window: Recorded steps in the moving statistic, odd (1: ``d`` is the statistic).
        statistic: ``"t"`` (moving paired t) or ``"z"`` (self-normalised moving sum); see
            :func:`moving_statistic` and the module docstring.
        threshold: Cluster-forming threshold c on |statistic|; default: for ``"t"`` Student's
            t 97.5% quantile with ``window − 1`` degrees of freedom, for ``"z"`` 1.96 (required
            when ``window=1``).
        n_permutations: Random sign patterns.
        block: Consecutive steps flipped together (≥ the autocorrelation length; see module).
        families: Family index per cell, int ``[*cells]``; a cluster's null is the largest mass
            over its family's cells. ``None``: every cell is its own family.
        seed: Seed of the sign patterns (same seed, same result, on either backend).
        backend: ``"numba"``, ``"numpy"``, or ``"auto"`` (numba where installed).

    Returns:
        A :class:`ClusterTest`.

    Raises:
        StreamspecError: for an even ``window``, an unknown statistic, a missing threshold,
            ``backend="numba"`` without numba, or bad shapes.
    """
    x = np.asarray(d, dtype=np.float64)
    if x.ndim < 1 or x.shape[0] < 1:
        raise StreamspecError.build("data [step, *cells] with steps", f"shape {x.shape}", "")
    if window < 1 or window % 2 == 0:
        raise StreamspecError.build(
            expected="an odd window >= 1 (steps centred on each step)",
            got=f"window={window}",
            fix="use e.g. window=9, or window=1 to threshold the input itself",
        )
    if threshold is None:
        if window == 1:
            raise StreamspecError.build(
                expected="a threshold when window=1 (the input is the statistic)",
                got="threshold=None",
                fix="pass e.g. threshold=2.0",
            )
        threshold = 1.96 if statistic == "z" else float(sps.t.ppf(0.975, window - 1))
    if statistic not in ("t", "z"):
        raise StreamspecError.build(
            "statistic 't' or 'z'", repr(statistic), "pick one of the two (see moving_statistic)"
        )
    if n_permutations < 1 or block < 1:
        raise StreamspecError.build(
            "n_permutations >= 1 and block >= 1",
            f"n_permutations={n_permutations}, block={block}",
            "pass positive integers",
        )
    name = _backend(backend)
    cells_shape = x.shape[1:]
    data = x.reshape(x.shape[0], -1).T  # [cells, step]
    n_cells, n_steps = data.shape
    fam = (
        np.arange(n_cells)
        if families is None
        else np.broadcast_to(np.asarray(families, dtype=np.int64), cells_shape).ravel()
    )
    _, fam = np.unique(fam, return_inverse=True)
    n_fam = int(fam.max()) + 1 if fam.size else 0

    stat = moving_statistic(data, window, statistic)
    row, start, stop, sign, mass, id_map = _runs(stat, threshold)

    flips = sign_flips(n_steps, n_permutations, block=block, seed=seed)
    null_cells = (_null_max_numba if name == "numba" else _null_max_numpy)(
        data, flips, window, threshold, statistic
    )
    null = np.zeros((n_permutations, n_fam))
    order = np.argsort(fam, kind="stable")
    if n_cells:
        bounds = np.flatnonzero(np.r_[True, np.diff(fam[order]) != 0])
        null = np.maximum.reduceat(null_cells[:, order], bounds, axis=1)
    exceed = (null[:, fam[row]] >= mass[None, :]).sum(axis=0)
    p = (1.0 + exceed) / (1.0 + n_permutations)

    cluster_p = np.where(id_map >= 0, p[np.maximum(id_map, 0)] if p.size else np.nan, np.nan)
    back = (n_steps, *cells_shape)
    return ClusterTest(
        statistic=stat.T.reshape(back),
        cluster_p=cluster_p.T.reshape(back),
        cluster_id=id_map.T.reshape(back),
        cell=np.stack(np.unravel_index(row, cells_shape), axis=1)
        if cells_shape
        else np.zeros((len(row), 0), dtype=np.int64),
        start=start,
        stop=stop,
        sign=sign,
        mass=mass,
        p=p,
        null=null,
        threshold=float(threshold),
        window=window,
        statistic_name=statistic,
        backend=name,
    )


def _backend(backend: str) -> str:
    if backend == "auto":
        return "numba" if numba is not None else "numpy"
    if backend == "numba" and numba is None:
        raise StreamspecError.build(
            expected="numba installed for backend='numba'",
            got="no numba",
            fix="`pip install streamspec[fast]`, or backend='numpy'",
        )
    if backend not in ("numba", "numpy"):
        raise StreamspecError.build(
            "backend 'auto', 'numba' or 'numpy'", repr(backend), "pick one of the three"
        )
    return backend


def cluster_test(
    ds: xr.Dataset,
    contrasts: ContrastSpec = "pairs",
    *,
    window: int = 9,
    statistic: Statistic = "z",
    threshold: float | None = None,
    n_permutations: int = 1000,
    block: int = 1,
    family: Literal["cell", "contrast", "all"] = "contrast",
    seed: int = 0,
    backend: Backend = "auto",
    **pool: Any,
) -> xr.Dataset:
    """Cluster permutation test of side a against side b along steps, for every cell at once.

    Runs :func:`cluster_permutation_test` on d_s = σ_a(s) − σ_b(s), cells = layer × kind ×
    contrast × rank, one set of sign patterns for all cells.

    Args:
        ds: A run's dataset (or :func:`~streamspec.analysis.stats.sides`).
        contrasts: Which sides to compare.
        window: Steps in the moving statistic (odd).
        statistic: ``"t"`` or ``"z"`` (see :func:`cluster_permutation_test`).
        threshold: Cluster-forming threshold (default: see :func:`cluster_permutation_test`).
        n_permutations: Random sign patterns.
        block: Consecutive recorded steps flipped together.
        family: Over which cells a cluster's null maximum is taken: ``"cell"`` (each layer,
            kind, contrast and rank alone), ``"contrast"`` (all layers × kinds × ranks of a
            contrast: family-wise control per contrast, as Maris & Oostenveld over channels ×
            time) or ``"all"``.
        seed: Seed of the sign patterns.
        backend: ``"auto"``, ``"numba"`` or ``"numpy"``.
        **pool: ``by``/``sep``/``level`` for pooled contrasts.

    Returns:
        Dataset with ``t`` (the moving statistic, t or z), ``cluster_p`` (p of each step's
        cluster, NaN outside) and ``cluster_id`` ``[step, layer, kind, contrast, rank]``; the
        clusters along ``cluster``: ``cluster_layer``, ``cluster_kind``,
        ``cluster_contrast``, ``cluster_rank``, ``cluster_start``/``cluster_stop`` (first/last
        ``step``, inclusive), ``cluster_sign``, ``cluster_mass``, ``cluster_pvalue``; attrs
        ``threshold``, ``window``, ``statistic``, ``block``, ``n_permutations``, ``family``,
        ``seed``, ``backend``.
    """
    sd = sides(ds, contrasts, **pool)
    diff = (sd["a"] - sd["b"]).transpose("step", "layer", "kind", "contrast", "rank")
    shape = diff.shape[1:]
    if family == "cell":
        fam = None
    elif family == "contrast":
        fam = np.broadcast_to(np.arange(shape[2])[None, None, :, None], shape)
    elif family == "all":
        fam = np.zeros(shape, dtype=np.int64)
    else:
        raise StreamspecError.build(
            "family 'cell', 'contrast' or 'all'", repr(family), "pick one of the three"
        )
    res = cluster_permutation_test(
        diff.values,
        window=window,
        statistic=statistic,
        threshold=threshold,
        n_permutations=n_permutations,
        block=block,
        families=fam,
        seed=seed,
        backend=backend,
    )
    dims = diff.dims
    steps = np.asarray(sd["step"].values)
    names = {d: np.asarray(sd[d].values) for d in dims[1:]}
    out = xr.Dataset(
        {
            "t": (dims, res.statistic),
            "cluster_p": (dims, res.cluster_p),
            "cluster_id": (dims, res.cluster_id),
            "cluster_layer": ("cluster", names["layer"][res.cell[:, 0]]),
            "cluster_kind": ("cluster", names["kind"][res.cell[:, 1]]),
            "cluster_contrast": ("cluster", names["contrast"][res.cell[:, 2]]),
            "cluster_rank": ("cluster", names["rank"][res.cell[:, 3]]),
            "cluster_start": ("cluster", steps[res.start]),
            "cluster_stop": ("cluster", steps[res.stop - 1]),
            "cluster_sign": ("cluster", res.sign),
            "cluster_mass": ("cluster", res.mass),
            "cluster_pvalue": ("cluster", res.p),
        },
        coords={d: sd[d] for d in dims},
        attrs={
            "threshold": res.threshold,
            "window": window,
            "statistic": statistic,
            "block": block,
            "n_permutations": n_permutations,
            "family": family,
            "seed": seed,
            "backend": res.backend,
        },
    )
    if "step_epoch" in sd.coords:
        out = out.assign_coords(step_epoch=sd["step_epoch"])
    return out
