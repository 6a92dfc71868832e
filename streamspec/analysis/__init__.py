"""Offline analysis of streamspec archives: group tests across steps and indices, figures.

>>> ds = streamspec.analysis.load("runs/a.zarr")
>>> sig = streamspec.analysis.significance(ds, "pooled", sep="/", correction="fdr")
>>> streamspec.analysis.save_report(["runs/a.zarr", "runs/b.zarr"], "report/")

- :mod:`.data`: open runs, select layers/groups, contrasts (pairs, one-vs-rest, pooled groups with
  count-weighted σ), windows (epoch, sliding, run).
- :mod:`.stats`: the two t-tests of Baker, Calhoun & Plis (2024) — across singular-value indices
  per step, and per index across steps (Welch or paired) — and Benjamini–Hochberg FDR.
- :mod:`.clusters`: cluster-based sign-flip permutation test along steps (numba if installed).
- :mod:`.significance`: per-window tests with FDR or cluster marks.
- :mod:`.figures` / :mod:`.report`: matplotlib figures (``pip install streamspec[plot]``) and an
  HTML index of PNGs.
"""

from streamspec.analysis.clusters import cluster_permutation_test, cluster_test
from streamspec.analysis.data import (
    Contrast,
    contrast_sigma,
    epoch_windows,
    load,
    one_vs_rest,
    pairs,
    pool,
    pooled_pairs,
    pooled_sigma,
    resolve_contrasts,
    run_window,
    select,
    sliding_windows,
)
from streamspec.analysis.figures import plot_comparison, plot_significance, plot_trajectories
from streamspec.analysis.report import save_comparison, save_report
from streamspec.analysis.significance import significance
from streamspec.analysis.stats import across_ranks, across_steps, fdr, fdr_bh, paired_t_test

__all__ = [
    "Contrast",
    "across_ranks",
    "across_steps",
    "cluster_permutation_test",
    "cluster_test",
    "contrast_sigma",
    "epoch_windows",
    "fdr",
    "fdr_bh",
    "load",
    "one_vs_rest",
    "paired_t_test",
    "pairs",
    "plot_comparison",
    "plot_significance",
    "plot_trajectories",
    "pool",
    "pooled_pairs",
    "pooled_sigma",
    "resolve_contrasts",
    "run_window",
    "save_comparison",
    "save_report",
    "select",
    "significance",
    "sliding_windows",
]
