"""`streamspec report | compare | export` on generated archives, and their error exits."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("matplotlib", reason="report and compare draw figures (the plot extra)")

from streamspec import store as streamspec_store  # noqa: E402
from streamspec.cli import main  # noqa: E402
from streamspec.store import open_archive  # noqa: E402
from tests.analysis._archives import write_synthetic  # noqa: E402
from tests.conftest import run_digits  # noqa: E402


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A real (small) watched training run: digits 0–3, two epochs."""
    path = tmp_path_factory.mktemp("cli") / "digits.zarr"
    run_digits(path, epochs=2, n_samples=256, record=False)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-syn")
    return write_synthetic(root / "ae.zarr", seed=0), write_synthetic(root / "clf.zarr", seed=1)


def linked_pngs(index) -> set[str]:
    return set(re.findall(r'href="([^"]+\.png)"', index.read_text()))


def test_report_writes_pngs_and_an_index(digits, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    args = ["report", str(digits), "-o", str(out), "--groups", "0", "1", "--layers", "0.*", "4.*"]
    assert main([*args, "--correction", "cluster", "--permutations", "50"]) == 0
    assert f"report: {out / 'index.html'}" in capsys.readouterr().out
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {
        "digits-trajectories-step.png",
        "digits-trajectories-epoch.png",
        "digits-significance-0_vs_1.png",
    }
    assert all((out / p).stat().st_size > 5000 for p in pngs)
    assert linked_pngs(out / "index.html") == pngs


def test_compare_writes_the_side_by_side_figures(synthetic, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    a, b = synthetic
    args = ["compare", str(a), str(b), "-o", str(out), "--contrasts", "pooled"]
    assert main([*args, "--names", "autoencoder", "classifier", "--method", "paired"]) == 0
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {
        "comparison-trajectories-step.png",
        "comparison-trajectories-epoch.png",
        "comparison-significance-SZ_vs_HC.png",
    }
    text = (out / "index.html").read_text()
    assert linked_pngs(out / "index.html") == pngs
    assert "autoencoder" in text and "classifier" in text and "paired" in text


def test_export_writes_a_zip_that_opens(synthetic, tmp_path, capsys) -> None:
    if not hasattr(streamspec_store, "export_archive"):
        pytest.skip("streamspec.store.export_archive is not there yet (added in parallel)")
    out = tmp_path / "run.zip"
    assert main(["export", str(synthetic[0]), str(out)]) == 0
    assert "export:" in capsys.readouterr().out
    assert open_archive(out).n_steps == open_archive(synthetic[0]).n_steps


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "decoder.*"], r"expected a layer of the run .*'encoder.fc1'"),
        (["--groups", "PT/F"], r"expected a group of the run .*'SZ/F'"),
        (["--contrasts", "SZ/F vs PT"], r"unknown group\(s\) \['PT'\]"),
    ],
)
def test_report_unknown_names_exit_2(synthetic, tmp_path, capsys, extra, message) -> None:
    assert main(["report", str(synthetic[0]), "-o", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Fix:" in err


@pytest.mark.parametrize("command", ["report", "compare", "export"])
def test_not_an_archive_exits_2(tmp_path, capsys, command) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    run = str(tmp_path / "notes")
    argv = {
        "report": ["report", run, "-o", str(tmp_path / "o")],
        "compare": ["compare", run, run, "-o", str(tmp_path / "o")],
        "export": ["export", run, str(tmp_path / "o.zip")],
    }[command]
    assert main(argv) == 2
    assert "expected a streamspec archive" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "export"])
def test_corrupt_archive_exits_2(tmp_path, capsys, command) -> None:
    path = write_synthetic(tmp_path / "run.zarr")
    chunk = next(p for p in (path / "sigma").rglob("*") if p.is_file() and "c" in p.parts)
    chunk.write_bytes(chunk.read_bytes()[:10])
    out = ["-o", str(tmp_path / "o")] if command == "report" else [str(tmp_path / "o.zip")]
    assert main([command, str(path), *out]) == 2
    err = capsys.readouterr().err
    assert "streamspec: expected" in err and "sigma" in err
    assert not (tmp_path / "o.zip").exists()
