"""``python -m bench``: streamspec's overhead and accuracy, side by side with the paper's approach.

    python -m bench --config cpu                     # the issue's CPU target (2 threads)
    python -m bench --config gpu-base --device cuda  # BERT-base size on one GPU
    python -m bench --config smoke                   # seconds; checks the harness itself
    python -m bench --config cnn3d --modes plain,watch,watch10,hostless   # the paper's 3-D CNN
    python -m bench --config lstm --modes plain,watch,watch10,hostless    # an LSTM, 200 steps

Writes ``bench/results/<config>-<device>.json`` and ``.md`` (or ``--out DIR``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.harness import CONFIGS, MODES, accuracy, measure, profile, report, save


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--modes",
        default="plain,watch,watch10,paper,lowrank",
        help=f"comma-separated subset of {MODES}",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: the config's, 2)"
    )
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--profile", type=int, default=0, help="profile N monitored steps too")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    cfg = CONFIGS[args.config]
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or cfg.threads)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    results = measure(cfg, device, modes)
    acc = None if args.no_accuracy else accuracy(cfg, device)
    data, table = report(cfg, device, results, acc)
    stem = save(args.out, f"{cfg.name}-{device.type}", data, table)
    print(table)
    if args.profile:
        text = profile(cfg, device, args.profile)
        (stem.parent / f"profile-{cfg.name}-{device.type}.txt").write_text(text + "\n")
        print(text[:4000])
    print(f"\nwritten: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
