"""Figures in the layout of Baker, Calhoun & Plis (2024, AutoSpec), rendered with Agg.

- :func:`plot_trajectories`: σ₁…σ_k over steps (or epochs); rows = layers, columns = kinds
  (activation, adjoint, gradient); one colour ramp per group, σ₁ darkest.
- :func:`plot_comparison`: the same for several runs side by side (the paper's panels A–F, e.g.
  an autoencoder against a classifier), one block of columns per run.
- :func:`plot_significance`: −log10 p maps, rank × epoch (or window), per layer and kind, with
  the cells that survive the correction marked (panels G–H); one block per run.

Functions return :class:`matplotlib.figure.Figure` objects attached to an Agg canvas: nothing
touches pyplot's global state or the user's backend, and ``fig.savefig("x.png")`` works in a
headless process. matplotlib is an optional extra: ``pip install streamspec[plot]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr

from streamspec.analysis.data import select
from streamspec.errors import StreamspecError

if TYPE_CHECKING:
    from matplotlib.figure import Figure, SubFigure

__all__ = ["GROUP_COLORMAPS", "plot_comparison", "plot_significance", "plot_trajectories"]

# One sequential ramp per group, in group order (the paper: blues for one group, oranges for
# the other); σ₁ takes the dark end.
GROUP_COLORMAPS: tuple[str, ...] = (
    "Blues",
    "Oranges",
    "Greens",
    "Purples",
    "Reds",
    "Greys",
    "YlOrBr",
    "PuRd",
    "BuGn",
    "GnBu",
)

_PANEL_W, _PANEL_H = 3.4, 2.2  # inches per panel
_LOG_RANGE = 1e-4  # log-scale panels show [1e-4·max, max]


def _figure(width: float, height: float) -> Figure:
    """A Figure on an Agg canvas, or a StreamspecError if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise StreamspecError.build(
            expected="matplotlib installed to draw figures",
            got=f"ImportError: {exc}",
            fix="`pip install streamspec[plot]`",
        ) from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _ramp(group_index: int, n_ranks: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps[GROUP_COLORMAPS[group_index % len(GROUP_COLORMAPS)]]
    return [cmap(v) for v in np.linspace(0.95, 0.35, max(n_ranks, 1))]


def _sigma(
    ds: xr.Dataset, x: str, smooth: int
) -> tuple[xr.DataArray, np.ndarray, np.ndarray | None]:
    """σ ``[time, layer, kind, group, rank]``, its x values and epoch starts (in x units)."""
    if x == "epoch":
        if "sigma_epoch" not in ds or ds.sizes.get("epoch", 0) == 0:
            raise StreamspecError.build(
                "a run with finished epochs for x='epoch'",
                "no epoch rows",
                "call mon.end_epoch() during training, or plot x='step'",
            )
        sig = ds["sigma_epoch"].transpose("epoch", "layer", "kind", "group", "rank")
        return sig, np.asarray(ds["epoch"].values), None
    sig = ds["sigma"].transpose("step", "layer", "kind", "group", "rank")
    if smooth > 1:
        # A centred moving *median*: an epoch's last, short batch (a few samples per group)
        # gives one-step spikes (mean-normalised adjoints carry the loss's 1/B) that a mean
        # would smear over the window.
        sig = sig.rolling(step=smooth, center=True, min_periods=1).median()
    steps = np.asarray(ds["step"].values)
    starts = None
    if "step_epoch" in ds.coords and steps.size:
        se = np.asarray(ds["step_epoch"].values)
        starts = steps[1:][np.diff(se) != 0]
    return sig, steps, starts


def auto_smooth(n_steps: int) -> int:
    """Default moving-median width for step plots: an odd width, about 1/60 of the run."""
    return max(1, (n_steps // 60) | 1)


def _draw_trajectories(
    target: Figure | SubFigure,
    ds: xr.Dataset,
    *,
    x: str,
    smooth: int,
    yscale: str,
    rows: int,
) -> tuple[list[tuple[Any, str]], int]:
    from matplotlib.ticker import NullFormatter

    sig, xs, starts = _sigma(ds, x, smooth)
    layers = [str(v) for v in ds["layer"].values]
    kinds = [str(v) for v in ds["kind"].values]
    groups = [str(v) for v in ds["group"].values]
    values = np.asarray(sig.values, dtype=np.float64)
    n_rank = values.shape[-1]
    axes = np.atleast_2d(target.subplots(rows, len(kinds), squeeze=False, sharex=True))
    handles = []
    for i in range(rows):
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            if i >= len(layers):
                ax.set_axis_off()
                continue
            for g, group in enumerate(groups):
                colors = _ramp(g, n_rank)
                for r in range(n_rank):
                    (line,) = ax.plot(
                        xs,
                        values[:, i, j, g, r],
                        color=colors[r],
                        lw=1.1 if r == 0 else 0.6,
                        marker="o" if len(xs) < 3 else None,  # a lone epoch is a point
                        ms=3,
                    )
                    if i == 0 and j == 0 and r == 0:
                        handles.append((line, group))
            if starts is not None:
                for s in starts:
                    ax.axvline(s, color="0.85", lw=0.5, zorder=0)
            finite = values[:, i, j][np.isfinite(values[:, i, j]) & (values[:, i, j] > 0)]
            if yscale == "log" and finite.size:
                ax.set_yscale("log")  # zeros (exact rank deficiency) are not drawn
                ax.yaxis.set_minor_formatter(NullFormatter())
                # float32 σ below ~1e-6·σ₁ are rounding; 1e-4·max keeps the informative range.
                top = float(finite.max())
                ax.set_ylim(max(float(finite.min()), top * _LOG_RANGE) / 1.3, top * 1.3)
            ax.tick_params(which="both", labelsize=7)
            ax.grid(True, which="major", lw=0.3, alpha=0.5)
            if i == 0:
                ax.set_title(kind, fontsize=9, fontweight="bold")
            if j == 0:
                ax.set_ylabel(f"{layers[i]}\nσ", fontsize=8)
            if i == min(rows, len(layers)) - 1:
                ax.tick_params(labelbottom=True)  # sharex hides it above switched-off panels
                ax.set_xlabel(
                    x if smooth <= 1 or x == "epoch" else f"{x} (moving median of {smooth})",
                    fontsize=8,
                )
    return handles, n_rank


def _legend(fig: Figure, handles: list[tuple[Any, str]], n_rank: int) -> None:
    if handles:
        fig.legend(
            [h for h, _ in handles],
            [f"group {name}" for _, name in handles],
            loc="outside lower center",
            ncol=min(len(handles), 6),
            fontsize=8,
            frameon=False,
            title=f"σ₁ (darkest) … σ{_sub(n_rank)} (lightest)",
            title_fontsize=8,
        )


def _sub(n: int) -> str:
    return str(n).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))


def plot_trajectories(
    ds: xr.Dataset,
    *,
    layers: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    ranks: int | None = 8,
    x: Literal["step", "epoch"] = "step",
    smooth: int | None = None,
    yscale: Literal["log", "linear"] = "log",
    title: str | None = None,
) -> Figure:
    """σ₁…σ_k of every group over training; rows = layers, columns = kinds.

    Args:
        ds: A run's dataset (``streamspec.open(path).to_xarray()``).
        layers: Layer names or glob patterns (default: all).
        kinds: Kinds to show (default: activation, adjoint, gradient).
        groups: Groups to show (default: all); group i gets colour ramp
            ``GROUP_COLORMAPS[i]``.
        ranks: Show σ₁…σ_ranks (default 8: beyond that, k lines per group crowd a panel;
            ``None``: all k).
        x: ``"step"``: per-step ``sigma`` over recorded steps (epoch starts as faint lines);
            ``"epoch"``: the epoch spectra ``sigma_epoch``.
        smooth: Centred moving mean over this many recorded steps (``x="step"``); default
            :func:`auto_smooth`.
        yscale: ``"log"`` (where all values are positive) or ``"linear"``.
        title: Figure title.

    Returns:
        The figure (Agg canvas).
    """
    ds = select(ds, layers=layers, kinds=kinds, groups=groups)
    if ranks is not None:
        ds = ds.isel(rank=slice(0, ranks))
    smooth = auto_smooth(ds.sizes["step"]) if smooth is None else int(smooth)
    rows = ds.sizes["layer"]
    fig = _figure(_PANEL_W * ds.sizes["kind"], _PANEL_H * rows + 1.0)
    _legend(fig, *_draw_trajectories(fig, ds, x=x, smooth=smooth, yscale=yscale, rows=rows))
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_comparison(
    runs: Mapping[str, xr.Dataset],
    *,
    layers: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    ranks: int | None = 8,
    x: Literal["step", "epoch"] = "step",
    smooth: int | None = None,
    yscale: Literal["log", "linear"] = "log",
    title: str | None = None,
) -> Figure:
    """Trajectories of several runs side by side: one block of kind columns per run.

    Runs may have different layers (an autoencoder is deeper than a classifier); each block has
    its own rows, labelled with its layer names.

    Args:
        runs: Run name → dataset, in display order.
        layers, kinds, groups, ranks, x, smooth, yscale: As :func:`plot_trajectories`, applied
            to every run (a layer pattern must match in each run).
        title: Figure title.

    Returns:
        The figure (Agg canvas).
    """
    picked = {}
    for name, ds in runs.items():
        one = select(ds, layers=layers, kinds=kinds, groups=groups)
        picked[name] = one.isel(rank=slice(0, ranks)) if ranks is not None else one
    rows = max(d.sizes["layer"] for d in picked.values())
    n_cols = sum(d.sizes["kind"] for d in picked.values())
    fig = _figure(_PANEL_W * n_cols + 0.3 * len(picked), _PANEL_H * rows + 1.3)
    subs = _subfigures(fig, len(picked))
    for k, (sub, (name, ds)) in enumerate(zip(subs, picked.items(), strict=True)):
        step_smooth = auto_smooth(ds.sizes["step"]) if smooth is None else int(smooth)
        drawn = _draw_trajectories(sub, ds, x=x, smooth=step_smooth, yscale=yscale, rows=rows)
        if k == 0:
            _legend(fig, *drawn)
        sub.suptitle(f"{chr(ord('A') + k)}. {name}", fontsize=11, fontweight="bold")
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def plot_significance(
    tests: Mapping[str, xr.Dataset] | xr.Dataset,
    contrast: str,
    *,
    layers: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    vmax: float | None = None,
    title: str | None = None,
) -> Figure:
    """−log10 p maps (rank × time) per layer and kind, significant cells outlined.

    Args:
        tests: Run name → result of
            :func:`~streamspec.analysis.significance.significance` (``p`` and ``significant``
            ``[time, layer, kind, contrast, rank]``, time = ``epoch`` or ``window``), or one
            such dataset.
        contrast: The contrast to show (e.g. ``"0 vs 1"``).
        layers: Layer names or patterns (default: all).
        kinds: Kinds (default: all three).
        vmax: Top of the colour scale in −log10 p (default: the largest finite value, at least
            −log10 0.001 = 3).
        title: Figure title.

    Returns:
        The figure (Agg canvas), one block of kind columns per run, a shared colour bar.
    """
    runs = {"": tests} if isinstance(tests, xr.Dataset) else dict(tests)
    picked = {}
    for name, t in runs.items():
        names = [str(c) for c in t["contrast"].values]
        if contrast not in names:
            raise StreamspecError.build(
                expected=f"a contrast of the tests ({', '.join(map(repr, names))})",
                got=repr(contrast),
                fix="name a contrast as the tests label it ('a vs b')",
            )
        one = t.sel(contrast=contrast)
        if layers is not None or kinds is not None:
            one = select(one, layers=layers, kinds=kinds)
        picked[name] = one
    logs = {
        n: -np.log10(np.clip(np.asarray(t["p"].values, dtype=np.float64), 1e-300, 1.0))
        for n, t in picked.items()
    }
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in logs.values()] + [np.zeros(1)])
    top = float(max(vmax if vmax is not None else finite.max(), 3.0 if vmax is None else 0.0))
    rows = max(t.sizes["layer"] for t in picked.values())
    n_cols = sum(t.sizes["kind"] for t in picked.values())
    fig = _figure(_PANEL_W * 0.85 * n_cols + 1.0, _PANEL_H * 0.9 * rows + 1.2)
    from matplotlib import colormaps

    cmap = colormaps["magma_r"].with_extremes(bad="0.88")
    subs = _subfigures(fig, len(picked))
    image = None
    for k, (sub, (name, t)) in enumerate(zip(subs, picked.items(), strict=True)):
        time_dim = str(t["p"].dims[0])
        tp = t.transpose(time_dim, "layer", "kind", "rank")
        lp = -np.log10(np.clip(np.asarray(tp["p"].values, dtype=np.float64), 1e-300, 1.0))
        marks = (
            np.asarray(tp["significant"].values, dtype=bool)
            if "significant" in tp
            else np.zeros(lp.shape, dtype=bool)
        )
        times = np.asarray(tp[time_dim].values)
        n_rank = tp.sizes["rank"]
        layers_k = [str(v) for v in tp["layer"].values]
        kinds_k = [str(v) for v in tp["kind"].values]
        axes = np.atleast_2d(sub.subplots(rows, len(kinds_k), squeeze=False))
        for i in range(rows):
            for j, kind in enumerate(kinds_k):
                ax = axes[i, j]
                if i >= len(layers_k):
                    ax.set_axis_off()
                    continue
                cell = lp[:, i, j, :].T  # [rank, time]
                image = ax.imshow(
                    np.ma.masked_invalid(cell),
                    aspect="auto",
                    interpolation="nearest",
                    cmap=cmap,
                    vmin=0.0,
                    vmax=top,
                    extent=(-0.5, len(times) - 0.5, n_rank + 0.5, 0.5),
                )
                rr, tt = np.nonzero(marks[:, i, j, :].T)
                if rr.size:
                    ax.scatter(
                        tt,
                        rr + 1,
                        marker="s",
                        s=_mark_size(len(times), n_rank),
                        lw=0.9,
                        facecolors="none",
                        edgecolors="#00b4d8",
                    )
                ax.set_xticks(_ticks(len(times)), [str(times[m]) for m in _ticks(len(times))])
                ax.set_yticks(_ticks(n_rank, base=1), [str(v) for v in _ticks(n_rank, base=1)])
                ax.tick_params(labelsize=7)
                if i == 0:
                    ax.set_title(kind, fontsize=9, fontweight="bold")
                if j == 0:
                    ax.set_ylabel(f"{layers_k[i]}\nσ index", fontsize=8)
                if i == min(rows, len(layers_k)) - 1:
                    ax.set_xlabel(time_dim, fontsize=8)
        head = f"{chr(ord('G') + k)}. {name}" if name else ""
        corr = t.attrs.get("correction", "")
        sub.suptitle(
            f"{head}{' — ' if head else ''}{contrast}"
            + (f"  (□: {corr}, α = {t.attrs.get('alpha', '')})" if corr else ""),
            fontsize=10,
            fontweight="bold",
        )
    if image is not None:
        last = subs[-1]  # one bar for all blocks (one colour scale); a bar cannot span subfigures
        bar = last.colorbar(image, ax=last.axes, shrink=0.6, pad=0.01, aspect=30)
        bar.set_label("−log10 p", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def _subfigures(fig: Figure, n: int) -> list[SubFigure]:
    """One subfigure per run, side by side."""
    return list(np.asarray(fig.subfigures(1, n, squeeze=False, wspace=0.02)).ravel())


def _ticks(n: int, base: int = 0, most: int = 8) -> list[int]:
    step = max(1, -(-n // most))
    return list(range(base, n + base, step))


def _mark_size(n_time: int, n_rank: int) -> float:
    """Marker area (points²) that roughly fills a map cell."""
    cells = max(n_time, n_rank * 1.5)
    return float(np.clip(900.0 / cells, 4.0, 60.0))
