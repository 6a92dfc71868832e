"""The bench harness runs end to end at smoke size (correctness only: no timing assertions)."""

from __future__ import annotations

import json

from bench.__main__ import main


def test_bench_smoke(tmp_path, capsys) -> None:
    assert main(["--config", "smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "smoke-cpu.json").read_text())
    assert set(data["modes"]) == {"plain", "watch", "watch10", "paper", "lowrank"}
    for mode in data["modes"].values():
        assert mode["median_step_ms"] > 0 and mode["ratio"] > 0
    assert data["modes"]["plain"]["ratio"] == 1.0
    acc = data["accuracy"]
    assert set(acc["sigma_err_coverage"]) == {"activation", "adjoint", "gradient"}
    assert "| watch |" in capsys.readouterr().out
    assert (tmp_path / "smoke-cpu.md").read_text().startswith("Config `smoke`")


def test_products_bench_smoke(tmp_path, capsys) -> None:
    """``python -m bench.products``: every variant computes the monitor's own products (checked
    inside the script, untimed), and the table covers every layer shape and variant."""
    from bench.products import main as products

    out = ["--config", "smoke", "--device", "cpu", "--repeats", "1", "--out", str(tmp_path)]
    assert products(out) == 0
    rows = json.loads((tmp_path / "products-smoke-cpu.json").read_text())
    assert set(rows) == {"in_proj", "out_proj", "linear1", "linear2"}
    for row in rows.values():
        assert row["max_gap"] < 1e-5
        assert row["monitor"] > 0 and row["layers 4"] > 0 and row["transposed split-k 8"] > 0
    assert "largest relative gap" in capsys.readouterr().out


def test_bench_diagnostic_modes_smoke(tmp_path, monkeypatch) -> None:
    """``hostless`` and ``batched`` run end to end; ``batched`` leaves the environment as it
    found it."""
    import os

    monkeypatch.delenv("STREAMSPEC_BATCH_LAYERS", raising=False)
    args = ["--config", "smoke", "--device", "cpu", "--out", str(tmp_path), "--no-accuracy"]
    assert main([*args, "--modes", "plain,hostless,batched"]) == 0
    data = json.loads((tmp_path / "smoke-cpu.json").read_text())
    assert set(data["modes"]) == {"plain", "hostless", "batched"}
    assert "STREAMSPEC_BATCH_LAYERS" not in os.environ
