"""Figures render headless (Agg) and the report indexes every PNG it writes."""

from __future__ import annotations

import re
import sys

import pytest

pytest.importorskip("matplotlib", reason="figures need the plot extra")

from matplotlib.figure import Figure  # noqa: E402

from streamspec.analysis import (  # noqa: E402
    load,
    plot_comparison,
    plot_significance,
    plot_trajectories,
    save_report,
    significance,
)
from streamspec.errors import StreamspecError  # noqa: E402
from tests.analysis._archives import write_synthetic  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    return write_synthetic(root / "a.zarr", seed=0), write_synthetic(root / "b.zarr", seed=1)


def png_ok(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_trajectories_layout(runs, tmp_path) -> None:
    ds = load(runs[0])
    fig = plot_trajectories(ds, title="synthetic")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2 * 3  # layers × kinds
    assert [ax.get_title() for ax in fig.axes[:3]] == ["activation", "adjoint", "gradient"]
    assert len(fig.axes[0].get_lines()) >= 4 * 4  # groups × ranks (plus epoch lines)
    fig.savefig(tmp_path / "t.png")
    assert png_ok(tmp_path / "t.png")
    epochs = plot_trajectories(ds, x="epoch", layers=["*fc2"], groups=["SZ/*"], ranks=2)
    assert len(epochs.axes) == 3 and len(epochs.axes[0].get_lines()) == 2 * 2


def test_comparison_and_significance(runs, tmp_path) -> None:
    a, b = load(runs[0]), load(runs[1]).sel(layer=["encoder.fc1"])
    fig = plot_comparison({"A": a, "B": b})
    assert len([ax for ax in fig.axes if ax.axison]) == 2 * 3 + 1 * 3  # B has one layer
    fig.savefig(tmp_path / "c.png")
    assert png_ok(tmp_path / "c.png")
    tests = {n: significance(d, "pooled") for n, d in (("A", a), ("B", load(runs[1])))}
    sig = plot_significance(tests, "SZ vs HC")
    sig.savefig(tmp_path / "s.png")
    assert png_ok(tmp_path / "s.png")
    with pytest.raises(StreamspecError, match="a contrast of the tests"):
        plot_significance(tests, "SZ vs PT")


def test_matplotlib_missing_is_a_clear_error(runs, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(StreamspecError, match=r"pip install streamspec\[plot\]"):
        plot_trajectories(load(runs[0]))


def test_save_report_indexes_every_png(runs, tmp_path) -> None:
    calls = []
    index = save_report(
        list(runs),
        tmp_path / "report",
        contrasts="pooled",
        progress=lambda done, total, what: calls.append((done, total, what)),
    )
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == sorted(
        [
            f"{r}-{what}.png"
            for r in ("a", "b")
            for what in ("trajectories-step", "trajectories-epoch", "significance-SZ_vs_HC")
        ]
        + [
            "comparison-trajectories-step.png",
            "comparison-trajectories-epoch.png",
            "comparison-significance-SZ_vs_HC.png",
        ]
    )
    assert all(png_ok(tmp_path / "report" / p) for p in pngs)
    linked = set(re.findall(r'src="([^"]+\.png)"', index.read_text()))
    assert linked == set(pngs)
    assert calls[-1] == (len(pngs), len(pngs), "index.html") and calls[0][0] == 0


def test_report_pages_deep_networks(runs, tmp_path) -> None:
    index = save_report([runs[0]], tmp_path / "r", max_rows=1, contrasts=["SZ/F vs HC/M"])
    names = sorted(p.name for p in (tmp_path / "r").glob("*.png"))
    assert "a-trajectories-step-p2.png" in names and "a-significance-SZ_F_vs_HC_M-p2.png" in names
    assert "layers 2/2" in index.read_text()
