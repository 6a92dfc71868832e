"""Per-window tests with a multiple-comparison correction: what the significance maps show.

:func:`significance` runs test 2 of :mod:`streamspec.analysis.stats` (per singular-value index,
across the steps of each window) and marks the cells that survive either

- ``correction="fdr"``: Benjamini–Hochberg at level α over time × layers × ranks, per kind and
  contrast (:func:`~streamspec.analysis.stats.fdr`), or
- ``correction="cluster"``: the cluster permutation test along steps
  (:func:`~streamspec.analysis.clusters.cluster_test`); a window's cell is marked when one of
  its steps lies in a cluster with p ≤ α (family-wise over the contrast's layers × kinds × ranks
  by default), or
- ``correction="none"``: p ≤ α, uncorrected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import xarray as xr

from streamspec.analysis.clusters import cluster_test
from streamspec.analysis.stats import ContrastSpec, _windows, across_steps, fdr, sides
from streamspec.errors import StreamspecError

__all__ = ["significance"]


def significance(
    ds: xr.Dataset,
    contrasts: ContrastSpec = "pairs",
    *,
    windows: str | xr.DataArray = "epoch",
    method: Literal["welch", "paired"] = "welch",
    correction: Literal["fdr", "cluster", "none"] = "fdr",
    alpha: float = 0.05,
    cluster: Mapping[str, Any] | None = None,
    **pool: Any,
) -> xr.Dataset:
    """Test 2 per window with significant cells marked.

    Args:
        ds: A run's dataset.
        contrasts: Which sides to compare (``"pairs"``, ``"one-vs-rest"``, ``"pooled"``, …).
        windows: ``"epoch"``, ``"run"`` or a mask from ``sliding_windows``.
        method: ``"welch"`` or ``"paired"`` (see :func:`~streamspec.analysis.stats.across_steps`).
        correction: ``"fdr"``, ``"cluster"`` or ``"none"``.
        alpha: Level of the FDR, of the cluster p, or of the raw p.
        cluster: Keyword arguments for :func:`~streamspec.analysis.clusters.cluster_test`
            (``window``, ``n_permutations``, ``block``, ``family``, ``seed``, ``backend``).
        **pool: ``by``/``sep``/``level`` for pooled contrasts.

    Returns:
        The :func:`~streamspec.analysis.stats.across_steps` dataset (``t``, ``p``, ``n_a``,
        ``n_b`` ``[time, layer, kind, contrast, rank]``) plus ``significant`` (bool, same dims)
        and, for ``"fdr"``, ``q``; attrs ``correction``, ``alpha``, ``method``.
    """
    sd = sides(ds, contrasts, **pool)
    out = across_steps(sd, windows=windows, method=method)
    if correction == "fdr":
        q = fdr(out["p"])
        out["q"] = q
        out["significant"] = q.fillna(np.inf) <= alpha
    elif correction == "none":
        out["significant"] = out["p"].fillna(np.inf) <= alpha
    elif correction == "cluster":
        res = cluster_test(sd, **dict(cluster or {}))
        steps_sig = np.nan_to_num(res["cluster_p"].values, nan=np.inf) <= alpha
        mask = np.asarray(_windows(sd, windows).values, dtype=np.float64)  # [window, step]
        hits = np.tensordot(mask, steps_sig.astype(np.float64), axes=(1, 0)) > 0
        out["significant"] = (out["p"].dims, hits)
        out.attrs.update({f"cluster_{k}": v for k, v in res.attrs.items()})
    else:
        raise StreamspecError.build(
            "correction 'fdr', 'cluster' or 'none'", repr(correction), "pick one of the three"
        )
    out.attrs.update({"correction": correction, "alpha": alpha, "method": method})
    return out
