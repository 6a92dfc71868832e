"""The `streamspec` console command."""

from __future__ import annotations

import subprocess
import sys

from streamspec.cli import main
from tests.conftest import run_digits


def test_info(tmp_path, capsys) -> None:
    store = tmp_path / "run.zarr"
    run_digits(store, epochs=1, n_samples=256, record=False)
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    for word in (
        "Sequential",
        "0, 1, 2, 3",
        "mean",
        "4 recorded",
        "0.weight",
        "4.weight",
        "size on disk",
    ):
        assert word in out, word


def test_info_on_a_non_archive_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["info", str(tmp_path)]) == 2
    assert "expected a streamspec archive" in capsys.readouterr().err


def test_console_script_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamspec.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "streamspec" in result.stdout


def test_size_on_disk_of_a_zip_archive(tmp_path) -> None:
    from streamspec.cli import _size_on_disk

    archive = tmp_path / "run.zip"
    archive.write_bytes(b"x" * 1234)
    assert _size_on_disk(archive) == 1234
