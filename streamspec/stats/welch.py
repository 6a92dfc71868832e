"""Streaming Welch t-tests between groups of samples, one cell at a time, in float64.

Each cell (one ``[layer, kind, group, rank]`` entry of a step's ``sigma``) keeps the streaming
moments ``(n, mean, M2)`` of its per-step values (Welford 1962), merged across chunks and DDP ranks
with the pairwise update of Chan, Golub & LeVeque (1979). The Welch test of two groups then needs
only their moments, so an epoch's tests cost O(cells) memory whatever the number of steps.

References:
    B. P. Welford, "Note on a method for calculating corrected sums of squares and products",
    Technometrics 4(3), 1962.
    T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating formulae and a pairwise algorithm for
    computing sample variances", Stanford CS report STAN-CS-79-773, 1979.
    B. L. Welch, "The generalization of 'Student's' problem when several different population
    variances are involved", Biometrika 34, 1947.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

from streamspec.errors import StreamspecError
from streamspec.layout import pair_indices

__all__ = ["GroupWelch", "Welford", "welch_t_test"]


def _check_shape(what: str, got: tuple[int, ...], expected: tuple[int, ...], fix: str) -> None:
    if tuple(got) != tuple(expected):
        raise StreamspecError.build(f"{what} of shape {tuple(expected)}", f"{tuple(got)}", fix)


class Welford:
    """Per-cell streaming ``(n, mean, M2)`` of float64 observations, omitting NaN.

    Every cell of an array of ``shape`` accumulates its own sample; a NaN observation is skipped
    (its ``n`` is not incremented), like ``nan_policy="omit"`` in scipy. States merge exactly with
    the Chan et al. pairwise formula, so chunked updates, batched updates and the merge of DDP
    shards all equal one pass, up to rounding.

    Attributes:
        shape: Shape of one observation, e.g. ``[layer, kind, group, rank]``.
        n: Observation counts, int64, ``shape``.
        mean: Running means, float64, ``shape``; 0 where ``n == 0`` (see :attr:`nanmean`).
        m2: Sums of squared deviations from the mean, float64, ``shape``.
    """

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(int(s) for s in shape)
        self.n = np.zeros(self.shape, dtype=np.int64)
        self.mean = np.zeros(self.shape, dtype=np.float64)
        self.m2 = np.zeros(self.shape, dtype=np.float64)

    def __repr__(self) -> str:
        return f"Welford(shape={self.shape}, n_max={int(self.n.max(initial=0))})"

    def _merge_moments(self, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        # Chan et al. (1979): combine (n_a, mean_a, M2_a) with (n_b, mean_b, M2_b). Empty sides
        # must have mean 0 (never NaN) so that they contribute exactly nothing.
        n_a = self.n.astype(np.float64)
        nb = n_b.astype(np.float64)
        n = n_a + nb
        # nb / n is exactly 1 when the cell was empty, so the first chunk's mean is copied bitwise.
        frac_b = np.divide(nb, n, out=np.zeros_like(n), where=n > 0)
        delta = mean_b - self.mean
        self.mean = self.mean + delta * frac_b
        self.m2 = self.m2 + m2_b + delta * delta * n_a * frac_b
        self.n = self.n + n_b.astype(np.int64)

    def update(self, x: ArrayLike) -> Welford:
        """Add one observation per cell.

        Args:
            x: One observation per cell, ``shape``; NaN cells are skipped.

        Returns:
            self, updated in place.
        """
        x = np.asarray(x, dtype=np.float64)
        _check_shape("one observation", x.shape, self.shape, "pass one value per cell")
        seen = ~np.isnan(x)
        self._merge_moments(seen.astype(np.int64), np.where(seen, x, 0.0), np.zeros(self.shape))
        return self

    def update_batch(self, x: ArrayLike) -> Welford:
        """Add a batch of observations per cell, equal to calling :meth:`update` on each row.

        The batch's own moments come from a two-pass, NaN-omitting mean and M2 in float64, then
        are merged with the Chan formula. (A one-pass float32 sum of squares can cancel to 0
        where the true variance is 1.)

        Args:
            x: Observations, ``[batch, *shape]``; NaN entries are skipped. An empty batch is a
                no-op.

        Returns:
            self, updated in place.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != len(self.shape) + 1 or x.shape[1:] != self.shape:
            raise StreamspecError.build(
                f"a batch of observations of shape [batch, *{self.shape}]",
                f"{x.shape}",
                "stack observations on axis 0",
            )
        if x.shape[0] == 0:
            return self
        seen = ~np.isnan(x)
        n_b = seen.sum(axis=0)
        x0 = np.where(seen, x, 0.0)
        mean_b = np.divide(x0.sum(axis=0), n_b, out=np.zeros(self.shape), where=n_b > 0)
        dev = np.where(seen, x - mean_b, 0.0)
        m2_b = (dev * dev).sum(axis=0)
        self._merge_moments(n_b, mean_b, m2_b)
        return self

    def merge(self, other: Welford) -> Welford:
        """Merge another state of the same shape into this one (Chan et al.).

        Args:
            other: State accumulated on other observations (another chunk, another DDP rank).

        Returns:
            self, updated in place; ``other`` is unchanged.
        """
        _check_shape("a Welford state", other.shape, self.shape, "merge states of one layout")
        self._merge_moments(other.n, other.mean, other.m2)
        return self

    @property
    def nanmean(self) -> np.ndarray:
        """Means, ``shape``, NaN where ``n == 0``."""
        return np.where(self.n > 0, self.mean, np.nan)

    @property
    def var(self) -> np.ndarray:
        """Unbiased (``ddof=1``) variances, ``shape``, NaN where ``n < 2``."""
        denom = (self.n - 1).astype(np.float64)
        return np.divide(self.m2, denom, out=np.full(self.shape, np.nan), where=self.n >= 2)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays for a checkpoint: ``{"n": int64, "mean": float64, "m2": float64}``."""
        return {"n": self.n.copy(), "mean": self.mean.copy(), "m2": self.m2.copy()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray]) -> Welford:
        """Rebuild a state saved by :meth:`state_dict`.

        Args:
            state: ``{"n", "mean", "m2"}`` arrays of one shape (lists or tensors' numpy views work).

        Returns:
            A new Welford holding copies of the arrays.
        """
        missing = {"n", "mean", "m2"} - set(state)
        if missing:
            raise StreamspecError.build(
                "a state with keys n, mean, m2",
                f"keys {sorted(state)}",
                "pass the dict returned by Welford.state_dict()",
            )
        n = np.array(state["n"], dtype=np.int64)
        out = cls(n.shape)
        mean = np.array(state["mean"], dtype=np.float64)
        m2 = np.array(state["m2"], dtype=np.float64)
        for name, arr in (("mean", mean), ("m2", m2)):
            _check_shape(f"state[{name!r}]", arr.shape, n.shape, "save and load one state whole")
        out.n, out.mean, out.m2 = n, mean, m2
        return out


def welch_t_test(
    mean_a: ArrayLike,
    var_a: ArrayLike,
    n_a: ArrayLike,
    mean_b: ArrayLike,
    var_b: ArrayLike,
    n_b: ArrayLike,
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Welch t-test from summary statistics, vectorised over broadcast cells.

    Follows ``scipy.stats.ttest_ind(a, b, equal_var=False)`` exactly, edge cases included:
    t = (m_a − m_b) / √(v_a + v_b) with v = s²/n; Welch–Satterthwaite dof
    ν = (v_a + v_b)² / (v_a²/(n_a − 1) + v_b²/(n_b − 1)), set to 1 where undefined (both
    variances zero), so two constant groups give t = ±inf, p = 0 (different values) or
    t = p = NaN (equal values); p = 2·T_ν(−|t|).

    Args:
        mean_a: Means of group a, any shape broadcastable with the others.
        var_a: Unbiased (``ddof=1``) variances of group a.
        n_a: Sample sizes of group a. Cells with ``n < 2`` on either side give NaN (the sample
            variance is undefined), as ``ttest_ind`` does.
        mean_b: Means of group b.
        var_b: Unbiased variances of group b.
        n_b: Sample sizes of group b.

    Returns:
        ``(t, p)``, float64 arrays of the broadcast shape; t > 0 where ``mean_a > mean_b``.
    """
    m_a, v_a, c_a, m_b, v_b, c_b = (
        np.asarray(v, dtype=np.float64) for v in (mean_a, var_a, n_a, mean_b, var_b, n_b)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        vn_a = v_a / c_a
        vn_b = v_b / c_b
        df = (vn_a + vn_b) ** 2 / (vn_a**2 / (c_a - 1) + vn_b**2 / (c_b - 1))
        # scipy's convention: an undefined dof only happens when both variances are zero, where
        # any non-NaN dof gives the same (±inf or NaN) t; the n < 2 cells are masked below.
        df = np.where(np.isnan(df), 1.0, df)
        t = (m_a - m_b) / np.sqrt(vn_a + vn_b)
    too_small = (c_a < 2) | (c_b < 2)
    t = np.where(too_small, np.nan, t)
    p = 2.0 * special.stdtr(df, -np.abs(t))
    return t, p


class GroupWelch:
    """Welch t-tests between every unordered pair of groups of a per-step ``sigma`` array.

    Each step contributes one observation per ``[layer, kind, group, rank]`` cell; the test of a
    pair ``(a, b)`` compares group a's per-step values with group b's, cell by cell, over all
    steps seen since the last :meth:`reset` (typically one epoch). Steps are autocorrelated, so
    the p-values are a monitoring signal, not an i.i.d. test.

    Attributes:
        shape: ``[layer, kind, group, rank]``.
        pairs: Group index pairs ``(a, b)``, in :func:`streamspec.layout.pair_indices` order.
        welford: The per-cell moments.
    """

    def __init__(self, shape: tuple[int, int, int, int]):
        if len(shape) != 4:
            raise StreamspecError.build(
                "a shape [layer, kind, group, rank]",
                f"{tuple(shape)}",
                "pass RunLayout.step_shape",
            )
        self.shape: tuple[int, int, int, int] = tuple(int(s) for s in shape)  # type: ignore[assignment]
        self.pairs = pair_indices(self.shape[2])
        self._index_a = np.array([a for a, _ in self.pairs], dtype=np.intp)
        self._index_b = np.array([b for _, b in self.pairs], dtype=np.intp)
        self.welford = Welford(self.shape)

    def __repr__(self) -> str:
        return f"GroupWelch(shape={self.shape}, steps={self.n_steps})"

    @property
    def n_steps(self) -> int:
        """Largest per-cell count: the number of steps seen (NaN cells count less)."""
        return int(self.welford.n.max(initial=0))

    def update(self, sigma: np.ndarray) -> GroupWelch:
        """Add one step.

        Args:
            sigma: ``[layer, kind, group, rank]``, the values as stored (float32); cast to float64
                here. NaN (a group absent from the step, a failed layer) is skipped per cell.

        Returns:
            self.
        """
        sigma = np.asarray(sigma)
        _check_shape("sigma", sigma.shape, self.shape, "pass one step's [layer, kind, group, rank]")
        self.welford.update(sigma.astype(np.float64))
        return self

    def update_batch(self, sigma: np.ndarray) -> GroupWelch:
        """Add several steps at once, e.g. read back from an archive.

        Args:
            sigma: ``[step, layer, kind, group, rank]``.

        Returns:
            self.
        """
        sigma = np.asarray(sigma)
        _check_shape("sigma", sigma.shape[1:], self.shape, "stack steps on axis 0")
        self.welford.update_batch(sigma.astype(np.float64))
        return self

    def merge(self, other: GroupWelch) -> GroupWelch:
        """Merge the steps of another accumulator (another chunk or DDP rank) into this one."""
        self.welford.merge(other.welford)
        return self

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """Welch t and two-sided p of every pair.

        Returns:
            ``(t, p)``, each float64 ``[layer, kind, pair, rank]``, with
            ``t = mean(a) − mean(b)`` over its standard error for pair ``(a, b)``; NaN where a
            group has fewer than two steps in that cell.
        """
        w = self.welford
        mean, var, n = w.mean, w.var, w.n
        ia, ib = self._index_a, self._index_b
        return welch_t_test(
            mean[:, :, ia], var[:, :, ia], n[:, :, ia], mean[:, :, ib], var[:, :, ib], n[:, :, ib]
        )

    def reset(self) -> None:
        """Forget every step (e.g. at the start of an epoch)."""
        self.welford = Welford(self.shape)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays for a checkpoint (see :meth:`Welford.state_dict`)."""
        return self.welford.state_dict()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray]) -> GroupWelch:
        """Rebuild an accumulator saved by :meth:`state_dict`."""
        welford = Welford.from_state_dict(state)
        out = cls(welford.shape)  # type: ignore[arg-type]
        out.welford = welford
        return out
