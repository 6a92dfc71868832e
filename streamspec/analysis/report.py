"""Write a run's (or several runs') figures as PNG files and an ``index.html`` that links them.

Per run: trajectories over steps and over epochs, and one significance map per contrast. With
two or more runs, also the side-by-side comparison (trajectories, and the significance maps of
every contrast the runs share). Layers are split into pages of ``max_rows`` rows so a deep
network still gives readable PNGs.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import xarray as xr

from streamspec.analysis.data import RunLike, load, select
from streamspec.analysis.figures import plot_comparison, plot_significance, plot_trajectories
from streamspec.analysis.significance import significance

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["save_comparison", "save_report"]

Progress = Callable[[int, int, str], None]


@dataclass
class _Job:
    section: str
    caption: str
    filename: str
    draw: Callable[[], Any]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def run_names(runs: Sequence[RunLike], names: Sequence[str] | None = None) -> list[str]:
    """Display names: ``names``, else each path's stem (``runs/a.zarr`` → ``a``), made unique."""
    if names is not None:
        out = [str(n) for n in names]
    else:
        out = [
            Path(os.fspath(r)).name.removesuffix(".zarr")
            if isinstance(r, str | os.PathLike)
            else f"run{i}"
            for i, r in enumerate(runs)
        ]
    seen: dict[str, int] = {}
    unique = []
    for n in out:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return unique


def _pages(layers: Sequence[str], max_rows: int) -> list[list[str]]:
    return [list(layers[i : i + max_rows]) for i in range(0, len(layers), max_rows)] or [[]]


def save_report(
    archives: Sequence[RunLike],
    out_dir: str | os.PathLike[str],
    *,
    names: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    contrasts: str | Sequence[str] = "pairs",
    method: Literal["welch", "paired"] = "welch",
    correction: Literal["fdr", "cluster", "none"] = "fdr",
    alpha: float = 0.05,
    cluster: Mapping[str, Any] | None = None,
    per_run: bool = True,
    max_rows: int = 8,
    dpi: int = 110,
    progress: Progress | None = None,
    **pool: Any,
) -> Path:
    """Render every figure of one or more runs into ``out_dir`` and index them.

    Args:
        archives: Archive paths/URLs, :class:`~streamspec.Archive` objects or datasets.
        out_dir: Output folder (created).
        names: Display names (default: path stems).
        layers: Layer names or glob patterns to show (each must match in every run).
        groups: Groups to show and test (names or patterns).
        contrasts: ``"pairs"``, ``"one-vs-rest"``, ``"pooled"`` or ``"a vs b"`` strings.
        method: ``"welch"`` or ``"paired"`` per-epoch tests.
        correction: ``"fdr"``, ``"cluster"`` or ``"none"`` (see
            :func:`~streamspec.analysis.significance.significance`).
        alpha: Significance level.
        cluster: Options for the cluster test (``n_permutations``, ``window``, ``block``, …).
        per_run: Also write each run's own figures (with several runs; one run always does).
        max_rows: Layers per PNG; deeper networks get several pages.
        dpi: PNG resolution.
        progress: Called as ``progress(done, total, what)`` before each figure and once at the
            end (``done == total``).
        **pool: ``by``/``sep``/``level`` for pooled contrasts.

    Returns:
        The path of ``index.html``.

    Raises:
        StreamspecError: for a path that is not an archive, a damaged archive, an unknown
            layer or group, or matplotlib missing.
    """
    out = Path(out_dir)
    labels = run_names(archives, names)
    runs: dict[str, xr.Dataset] = {}
    for label, run in zip(labels, archives, strict=True):
        runs[label] = select(load(run), layers=layers, groups=groups)
    tests: dict[str, xr.Dataset] = {}

    def tested(label: str) -> xr.Dataset:
        if label not in tests:
            tests[label] = significance(
                runs[label],
                contrasts,
                method=method,
                correction=correction,
                alpha=alpha,
                cluster=cluster,
                **pool,
            )
        return tests[label]

    # Resolve contrasts now: an unknown group in a contrast fails before any drawing.
    contrast_names = {
        label: [str(c) for c in tested(label)["contrast"].values]
        if runs[label].sizes["group"] > 1
        else []  # one group: trajectories only
        for label in runs
    }
    jobs: list[_Job] = []
    if per_run or len(runs) == 1:
        for label, ds in runs.items():
            slug = _slug(label)
            layer_pages = _pages([str(v) for v in ds["layer"].values], max_rows)
            for k, page in enumerate(layer_pages):
                suffix = f"-p{k + 1}" if len(layer_pages) > 1 else ""
                part = f" (layers {k + 1}/{len(layer_pages)})" if len(layer_pages) > 1 else ""
                for x in ("step", "epoch"):
                    if x == "epoch" and ds.sizes.get("epoch", 0) == 0:
                        continue
                    jobs.append(
                        _Job(
                            label,
                            f"σ over {x}s{part}",
                            f"{slug}-trajectories-{x}{suffix}.png",
                            partial(
                                plot_trajectories,
                                ds,
                                layers=page,
                                x=x,
                                title=f"{label}: σ by group over {x}s",
                            ),
                        )
                    )
                if ds.sizes.get("epoch", 0) == 0:
                    continue
                for c in contrast_names[label]:
                    jobs.append(
                        _Job(
                            label,
                            f"significance, {c}{part}",
                            f"{slug}-significance-{_slug(c)}{suffix}.png",
                            partial(
                                _significance_page,
                                tested,
                                [label],
                                c,
                                slice(k * max_rows, (k + 1) * max_rows),
                            ),
                        )
                    )
    if len(runs) > 1:
        jobs += _comparison_jobs(runs, tested, contrast_names, max_rows)

    out.mkdir(parents=True, exist_ok=True)
    written: list[_Job] = []
    for i, job in enumerate(jobs):
        if progress is not None:
            progress(i, len(jobs), job.filename)
        fig = job.draw()
        fig.savefig(out / job.filename, dpi=dpi)
        written.append(job)
    if progress is not None:
        progress(len(jobs), len(jobs), "index.html")
    return _write_index(out, written, runs, method=method, correction=correction, alpha=alpha)


def _comparison_jobs(
    runs: dict[str, xr.Dataset],
    tested: Callable[[str], xr.Dataset],
    contrast_names: dict[str, list[str]],
    max_rows: int,
) -> list[_Job]:
    section = "comparison: " + " | ".join(runs)
    deepest = max(ds.sizes["layer"] for ds in runs.values())
    n_pages = max(1, -(-deepest // max_rows))
    jobs: list[_Job] = []
    for k in range(n_pages):
        # Page k shows layers k·max_rows … of each run (runs differ in depth).
        part = f" (layers {k + 1}/{n_pages})" if n_pages > 1 else ""
        suffix = f"-p{k + 1}" if n_pages > 1 else ""
        paged = {
            n: ds.isel(layer=slice(k * max_rows, (k + 1) * max_rows))
            for n, ds in runs.items()
            if ds.sizes["layer"] > k * max_rows
        }
        if len(paged) < 2:
            continue
        for x in ("step", "epoch"):
            if x == "epoch" and any(d.sizes.get("epoch", 0) == 0 for d in paged.values()):
                continue
            jobs.append(
                _Job(
                    section,
                    f"σ over {x}s, side by side{part}",
                    f"comparison-trajectories-{x}{suffix}.png",
                    partial(plot_comparison, paged, x=x),
                )
            )
        shared = [
            c
            for c in next(iter(contrast_names.values()))
            if all(c in names for names in contrast_names.values())
        ]
        if any(d.sizes.get("epoch", 0) == 0 for d in paged.values()):
            continue
        for c in shared:
            jobs.append(
                _Job(
                    section,
                    f"significance side by side, {c}{part}",
                    f"comparison-significance-{_slug(c)}{suffix}.png",
                    partial(
                        _significance_page,
                        tested,
                        list(paged),
                        c,
                        slice(k * max_rows, (k + 1) * max_rows),
                    ),
                )
            )
    return jobs


def _significance_page(
    tested: Callable[[str], xr.Dataset], labels: list[str], contrast: str, layers: slice
) -> Figure:
    """The significance maps of ``labels`` for one contrast and one page of layers."""
    return plot_significance({n: tested(n).isel(layer=layers) for n in labels}, contrast)


def save_comparison(
    run_a: RunLike,
    run_b: RunLike,
    out_dir: str | os.PathLike[str],
    *,
    names: Sequence[str] | None = None,
    **options: Any,
) -> Path:
    """The comparison figures of two runs (and the significance maps of both), indexed.

    Same options as :func:`save_report`; only the side-by-side figures are written.

    Returns:
        The path of ``index.html``.
    """
    return save_report([run_a, run_b], out_dir, names=names, per_run=False, **options)


def _write_index(
    out: Path,
    jobs: Sequence[_Job],
    runs: Mapping[str, xr.Dataset],
    *,
    method: str,
    correction: str,
    alpha: float,
) -> Path:
    from streamspec._version import __version__

    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>streamspec report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "img{max-width:100%;border:1px solid #ddd;margin:.3em 0 1.5em}"
        "td,th{padding:.2em .8em;text-align:left}</style></head><body>",
        "<h1>streamspec report</h1>",
        "<table><tr><th>run</th><th>steps</th><th>epochs</th><th>layers</th><th>groups</th>"
        "<th>rank</th><th>normalize</th></tr>",
    ]
    for name, ds in runs.items():
        parts.append(
            f"<tr><td>{esc(name)}</td><td>{ds.sizes['step']}</td>"
            f"<td>{ds.sizes.get('epoch', 0)}</td><td>{ds.sizes['layer']}</td>"
            f"<td>{esc(', '.join(map(str, ds['group'].values.tolist())))}</td>"
            f"<td>{ds.sizes['rank']}</td><td>{esc(str(ds.attrs.get('normalize', '')))}</td></tr>"
        )
    parts.append("</table>")
    marked = {
        "fdr": f"Benjamini–Hochberg q ≤ {alpha} (family: epochs × layers × ranks, per kind and "
        "contrast)",
        "cluster": "a step of the epoch lies in a cluster of the sign-flip permutation test "
        f"along steps with p ≤ {alpha} (family-wise over the contrast's cells)",
        "none": f"p ≤ {alpha}, uncorrected",
    }.get(correction, correction)
    parts.append(
        f"<p>Significance maps: −log10 p of a {esc(method)} t-test per σ index across each "
        f"epoch's steps; outlined cells: {esc(marked)}. Steps are autocorrelated: per-epoch "
        "p-values are a monitoring signal, not an i.i.d. test.</p>"
    )
    section = None
    contents = []
    for job in jobs:
        if job.section != section:
            section = job.section
            anchor = _slug(section)
            contents.append(f'<li><a href="#{anchor}">{esc(section)}</a></li>')
            parts.append(f'<h2 id="{anchor}">{esc(section)}</h2>')
        parts.append(
            f'<h3>{esc(job.caption)}</h3><a href="{esc(job.filename)}">'
            f'<img src="{esc(job.filename)}" alt="{esc(job.caption)}"></a>'
        )
    parts.insert(5, "<ul>" + "".join(contents) + "</ul>")
    parts.append(f"<p><small>streamspec {esc(__version__)}</small></p></body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index
