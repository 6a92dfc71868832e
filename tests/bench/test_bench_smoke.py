"""The bench harness runs end to end at smoke size (correctness only: no timing assertions)."""

from __future__ import annotations

import json

import torch

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
    """``hostless``, ``batched`` and ``stacked`` run end to end; ``batched`` leaves the
    environment as it found it; ``--profile`` writes torch's tables and the training thread's
    cProfile, which sees streamspec's hooks."""
    import os

    monkeypatch.delenv("STREAMSPEC_BATCH_LAYERS", raising=False)
    args = ["--config", "smoke", "--device", "cpu", "--out", str(tmp_path), "--no-accuracy"]
    assert main([*args, "--modes", "plain,hostless,batched,stacked", "--profile", "1"]) == 0
    data = json.loads((tmp_path / "smoke-cpu.json").read_text())
    assert set(data["modes"]) == {"plain", "hostless", "batched", "stacked"}
    assert "STREAMSPEC_BATCH_LAYERS" not in os.environ
    text = (tmp_path / "profile-smoke-cpu.txt").read_text()
    tables, python = text.split("The training thread's Python (cProfile, further steps: 1):")
    assert "streamspec.end_step" in tables
    assert "streamspec/monitor.py" in python and "tottime" in python


def test_bench_model_families_smoke() -> None:
    """The 3-D CNN and LSTM families train, time and pass the exact-route accuracy check at a
    tiny size (correctness of the harness only)."""
    from bench.harness import Config, ModeResult, accuracy, run_mode

    device = torch.device("cpu")
    for cfg in (
        Config("t3d", 1, 3, 0, 8, 4, 8, steps=2, warmup=1, repetitions=1, rank=4, family="cnn3d"),
        Config("tlstm", 5, 1, 0, 12, 6, 7, steps=2, warmup=1, repetitions=1, rank=4, family="lstm"),
    ):
        for mode in ("plain", "watch"):
            result = ModeResult(mode)
            run_mode(cfg, mode, device, result)
            assert len(result.step_ms) == 1 and result.step_ms[0] > 0
        acc = accuracy(cfg, device, steps=2)
        assert set(acc["sigma_err_coverage"]) == {"activation", "adjoint", "gradient"}
        assert acc["per_class"], cfg.family
