"""Accuracy of recorded spectra against float64 SVDs of the exact matrices (real digits training).

    python -m bench.accuracy [--epochs 4] [--json out.json]

Runs the digits MLP of ``examples/mlp_digits.py`` (64-64-64-10, rank 16, groups = digits 0–3)
with the monitor and an independent exact recorder, then reports relative errors of σ₁..σ_k
(values above 1e-4·σ₁) per kind, for per-step spectra (default exact route, and the sketched route
forced with ``exact_rows=0`` and batches of 512) and for epoch spectra.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from streamspec.layout import KINDS
from streamspec.testing.digits import run_digits


def relative_errors(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    keep = np.isfinite(exact) & (exact > 1e-4 * np.nan_to_num(exact[..., :1]))
    return np.abs(got[keep] - exact[keep]) / exact[keep]


def run(
    *,
    epochs: int,
    batch_size: int,
    groups: list[str],
    labels,
    exact_rows,
    hidden: int = 64,
    rank: int = 16,
    oversample: int = 10,
):
    result = run_digits(
        epochs=epochs,
        batch_size=batch_size,
        groups=groups,
        label_fn=labels,
        hidden=hidden,
        rank=rank,
        n_samples=None,
        optimizer="adam",
        shuffle_seed=0,
        exact_rows=exact_rows,
        oversample=oversample,
    )
    ds, rec, epoch_steps = result.ds, result.recorder, result.epoch_steps
    layers = [str(n) for n in ds["layer"].values]
    n_groups, k = ds.sizes["group"], ds.sizes["rank"]
    per_step = {kind: [] for kind in KINDS}
    sigma = ds["sigma"].values
    for s in range(sigma.shape[0]):
        for li, name in enumerate(layers):
            for c in range(n_groups):
                exact = rec.spectra([s], name, c, k)
                for ki, kind in enumerate(KINDS):
                    per_step[kind].append(relative_errors(sigma[s, li, ki, c], exact[ki]))
    per_epoch = []
    for e, steps in enumerate(epoch_steps):
        errs = {kind: [] for kind in KINDS}
        for li, name in enumerate(layers):
            for c in range(n_groups):
                exact = rec.spectra(steps, name, c, k)
                for ki, kind in enumerate(KINDS):
                    errs[kind].append(
                        relative_errors(ds["sigma_epoch"].values[e, li, ki, c], exact[ki])
                    )
        per_epoch.append({kind: np.concatenate(v) for kind, v in errs.items()})
    return {kind: np.concatenate(v) for kind, v in per_step.items()}, per_epoch


def summary(errs: np.ndarray) -> dict[str, float]:
    return {
        "median": float(np.median(errs)),
        "p99": float(np.percentile(errs, 99)),
        "n": int(errs.size),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--json", default=None)
    p.add_argument("--oversample", type=int, default=10)
    args = p.parse_args(argv)
    first4 = lambda y: torch.where(y < 4, y, torch.full_like(y, -1))  # noqa: E731
    halves = lambda y: (y >= 5).long()  # noqa: E731
    configs = {
        "batch 64, groups 0–3 (default route: exact)": dict(
            batch_size=64, groups=["0", "1", "2", "3"], labels=first4, exact_rows=None
        ),
        "batch 512, groups <5 / ≥5 (sketched route)": dict(
            batch_size=512, groups=["low", "high"], labels=halves, exact_rows=0
        ),
    }
    out: dict[str, object] = {"device": "cpu", "torch": torch.__version__}
    lines = ["| run | spectra | kind | median rel. error | p99 |", "|---|---|---|---|---|"]
    for name, cfg in configs.items():
        steps, epochs = run(epochs=args.epochs, oversample=args.oversample, **cfg)
        out[name] = {
            "step": {k: summary(v) for k, v in steps.items()},
            "epoch": [{k: summary(v) for k, v in e.items()} for e in epochs],
        }
        for kind, v in steps.items():
            s = summary(v)
            lines.append(f"| {name} | per step | {kind} | {s['median']:.1e} | {s['p99']:.1e} |")
        for e, errs in enumerate(epochs):
            if e in (0, len(epochs) - 1):
                for kind, v in errs.items():
                    s = summary(v)
                    lines.append(
                        f"| {name} | epoch {e} | {kind} | {s['median']:.1e} | {s['p99']:.1e} |"
                    )
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
