"""Every example runs (small settings) and leaves a readable archive."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import streamspec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", ["classify", "autoencode"])
def test_mlp_digits(tmp_path, capsys, task) -> None:
    store = tmp_path / "digits.zarr"
    example = load("mlp_digits")
    assert (
        example.main(["--task", task, "--epochs", "2", "--store", str(store), "--live", "off"]) == 0
    )
    out = capsys.readouterr().out
    assert str(store) in out
    ds = streamspec.open(store).to_xarray()
    assert ds.sizes["epoch"] == 2 and ds.sizes["group"] == 4
    assert np.isfinite(ds["welch_t"].values).any()
    # Refuses to overwrite without --overwrite.
    assert example.main(["--epochs", "1", "--store", str(store), "--live", "off"]) == 2
