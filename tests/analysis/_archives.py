"""Small synthetic archives written with the real writer: fast, with planted group differences."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamspec.layout import RunLayout
from streamspec.stats import GroupWelch
from streamspec.store import ArchiveWriter

GROUPS = ("SZ/F", "SZ/M", "HC/F", "HC/M")
LAYERS = ("encoder.fc1", "encoder.fc2")


def synthetic_sigma(
    seed: int = 0, *, epochs: int = 3, steps_per_epoch: int = 12, rank: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sigma [step, layer, kind, group, rank] float32, count [step, group], step_epoch)``.

    SZ groups' σ₁ of ``encoder.fc1`` activations is 30% larger from the second epoch on; one
    step has no HC/M sample (NaN σ, count 0); one group-step is rank-deficient (NaN tail).
    """
    rng = np.random.default_rng(seed)
    n = epochs * steps_per_epoch
    base = 4.0 * 0.5 ** np.arange(rank)
    drift = 1.0 + 0.02 * np.arange(n)
    shape = (n, len(LAYERS), 3, len(GROUPS), rank)
    sigma = base * drift[:, None, None, None, None] * (1.0 + 0.05 * rng.standard_normal(shape))
    sigma[steps_per_epoch:, 0, 0, :2, 0] *= 1.3
    count = rng.integers(1, 9, size=(n, len(GROUPS)))
    count[5, 3] = 0
    sigma[5, :, :, 3] = np.nan
    sigma[7, :, :, 1, rank - 1] = np.nan
    step_epoch = np.repeat(np.arange(epochs), steps_per_epoch)
    return np.sort(sigma, axis=-1)[..., ::-1].astype(np.float32), count, step_epoch


def write_synthetic(path: Path | str, seed: int = 0, **kwargs: int) -> Path:
    """Write :func:`synthetic_sigma` as an archive (per-epoch Welch rows like a real run)."""
    sigma, count, step_epoch = synthetic_sigma(seed, **kwargs)
    rank = sigma.shape[-1]
    layout = RunLayout(layers=LAYERS, groups=GROUPS, rank=rank, model="Synthetic")
    with ArchiveWriter(path, layout) as writer:
        for epoch in np.unique(step_epoch):
            rows = np.flatnonzero(step_epoch == epoch)
            for s in rows:
                writer.append_step({"sigma": sigma[s], "count": count[s]}, step=s, epoch=epoch)
            welch = GroupWelch(layout.step_shape).update_batch(sigma[rows])
            t, p = welch.compute()
            writer.append_epoch(
                {"sigma_epoch": np.nanmean(sigma[rows], axis=0), "welch_t": t, "welch_p": p},
                epoch=epoch,
            )
    return Path(path)
