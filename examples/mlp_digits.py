"""An MLP on scikit-learn's bundled handwritten digits, watched by streamspec.

Groups are the digits 0–3 (the paper's "first 4 classes"); digits 4–9 train the model but belong
to no group. ``--task classify`` trains a classifier, ``--task autoencode`` an autoencoder.

    python examples/mlp_digits.py --epochs 20 --store runs/digits.zarr
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import streamspec

GROUPS = ["0", "1", "2", "3"]


def build(task: str, hidden: int) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
    ]
    if task == "classify":
        layers.append(nn.Linear(hidden, 10))
    else:
        layers += [nn.Linear(hidden, 16), nn.ReLU(), nn.Linear(16, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden, 64))
    return nn.Sequential(*layers)


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1]; group = the digit for 0–3, -1 otherwise."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    g = torch.where(y < len(GROUPS), y, torch.full_like(y, -1))
    return x, y, g


def train(
    *,
    task: str = "classify",
    epochs: int = 20,
    batch_size: int = 64,
    hidden: int = 64,
    rank: int = 16,
    store: str | None = None,
    live: bool | None = None,
    resume: bool = False,
    seed: int = 0,
    monitor: bool = True,
) -> nn.Module:
    """Train and (optionally) watch; returns the trained model."""
    torch.manual_seed(seed)
    x, y, g = data()
    model = build(task, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss() if task == "classify" else nn.MSELoss()
    order = torch.Generator().manual_seed(seed)
    mon = (
        streamspec.watch(model, GROUPS, rank=rank, store=store, live=live, resume=resume)
        if monitor
        else None
    )
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=order)
            for start in range(0, len(x), batch_size):
                idx = perm[start : start + batch_size]
                if mon is not None:
                    mon.label(g[idx])
                out = model(x[idx])
                loss = loss_fn(out, y[idx] if task == "classify" else x[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if mon is not None:
                mon.end_epoch()
    finally:
        if mon is not None:
            mon.close()
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", choices=["classify", "autoencode"], default="classify")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--store", default="runs/digits.zarr", help="archive path ('' keeps it in memory)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing archive at --store"
    )
    p.add_argument("--live", choices=["auto", "on", "off"], default="auto")
    args = p.parse_args(argv)
    store = args.store or None
    if store and Path(store).exists():
        if not args.overwrite:
            print(
                f"{store} exists: pass --overwrite to replace it, or another --store",
                file=sys.stderr,
            )
            return 2
        import shutil

        shutil.rmtree(store)
    live = {"auto": None, "on": True, "off": False}[args.live]
    train(
        task=args.task,
        epochs=args.epochs,
        batch_size=args.batch_size,
        hidden=args.hidden,
        rank=args.rank,
        store=store,
        live=live,
    )
    if store:
        ds = streamspec.open(store).to_xarray()
        t = np.abs(ds["welch_t"].isel(epoch=-1).values)
        print(
            f"archive: {store} — {ds.sizes['step']} steps, {ds.sizes['epoch']} epochs, "
            f"{ds.sizes['layer']} layers, groups {ds['group'].values.tolist()}; "
            f"largest |Welch t| in the last epoch: {np.nanmax(t):.2f}\n"
            f"read it with: streamspec.open({store!r}).to_xarray()  or  streamspec info {store}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
