"""The ``streamspec`` command: look at archives from a terminal.

streamspec info RUN                      layers, groups, steps, epochs, rank, normalisation, size
streamspec report RUN [RUN ...] -o DIR   figures (PNG) and an index.html linking them
streamspec compare RUN_A RUN_B -o DIR    side-by-side trajectories and significance maps
streamspec export RUN OUT.zip            a finished run as one zip file (a Zarr ZipStore)

Every usage error (not an archive, a damaged archive, an unknown layer or group) exits with
code 2 and a message saying what was expected, what was got and how to fix it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from streamspec._version import __version__
from streamspec.errors import StreamspecError


def _size_on_disk(path: Path) -> int | None:
    if not path.exists():
        return None
    if path.is_file():  # a zip archive
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def cmd_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from streamspec.store.reader import open_archive

    archive = open_archive(args.run)
    layout = archive.layout
    console = Console()
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    n_steps, n_epochs = archive.n_steps, archive.n_epochs
    table.add_row("archive", str(args.run))
    table.add_row("model", str(archive.attrs.get("model", "")))
    table.add_row("groups", ", ".join(layout.groups))
    table.add_row("rank", str(layout.rank))
    table.add_row("normalize", layout.normalize)
    table.add_row("every", str(layout.every))
    table.add_row("steps", f"{n_steps} recorded")
    table.add_row("epochs", str(n_epochs))
    table.add_row("layers", str(len(layout.layers)))
    size = _size_on_disk(Path(args.run)) if isinstance(args.run, str) else None
    if size is not None:
        per_step = f" ({_human(size / n_steps)} per recorded step)" if n_steps else ""
        table.add_row("size on disk", _human(size) + per_step)
    for key in ("streamspec_version", "created"):
        if key in archive.attrs:
            table.add_row(key, str(archive.attrs[key]))
    console.print(table)
    layers = Table(title="layers", show_lines=False)
    layers.add_column("#", justify="right")
    layers.add_column("layer")
    for i, name in enumerate(layout.layers):
        layers.add_row(str(i), name)
    console.print(layers)
    return 0


def _contrasts(values: list[str]) -> str | list[str]:
    if len(values) == 1 and " vs " not in values[0]:
        return values[0]
    return values


def _report_options(args: argparse.Namespace) -> dict[str, Any]:
    cluster = {
        "n_permutations": args.permutations,
        "window": args.window,
        "statistic": args.statistic,
        "block": args.block,
        "seed": args.seed,
    }
    return {
        "names": args.names,
        "layers": args.layers,
        "groups": args.groups,
        "contrasts": _contrasts(args.contrasts),
        "method": args.method,
        "correction": args.correction,
        "alpha": args.alpha,
        "cluster": cluster,
        "max_rows": args.max_rows,
        "dpi": args.dpi,
        "sep": args.sep,
        "level": args.level,
    }


def _with_progress(what: str, write: Callable[[Callable[[int, int, str], None]], Path]) -> int:
    """Run ``write(progress)`` under a rich progress bar on stderr; print the index path."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[item]}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=None, item="reading runs and testing")

        def progress(done: int, total: int, item: str) -> None:
            bar.update(task, completed=done, total=total, item=item)

        index = write(progress)
    print(f"{what}: {index}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from streamspec.analysis.report import save_report

    options = _report_options(args)
    return _with_progress(
        "report",
        lambda progress: save_report(args.runs, args.output, progress=progress, **options),
    )


def cmd_compare(args: argparse.Namespace) -> int:
    from streamspec.analysis.report import save_comparison

    options = _report_options(args)
    return _with_progress(
        "compare",
        lambda progress: save_comparison(
            args.run_a, args.run_b, args.output, progress=progress, **options
        ),
    )


def cmd_export(args: argparse.Namespace) -> int:
    from streamspec import store

    export = getattr(store, "export_archive", None)
    if export is None:
        raise StreamspecError.build(
            expected="streamspec.store.export_archive in this version of streamspec",
            got="no such function",
            fix="update streamspec, or zip the archive folder yourself",
        )
    from streamspec.store.reader import open_archive

    check = getattr(open_archive(args.run), "check", None)
    if callable(check):
        check()  # a damaged archive is refused before anything is written
    out = export(args.run, args.output)
    print(f"export: {out if out is not None else args.output}")
    return 0


def _add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="output folder (created)")
    p.add_argument("--names", nargs="+", help="display names of the runs (default: path stems)")
    p.add_argument("--layers", nargs="+", help="layer names or glob patterns (default: all)")
    p.add_argument("--groups", nargs="+", help="group names or glob patterns (default: all)")
    p.add_argument(
        "--contrasts",
        nargs="+",
        default=["pairs"],
        help="'pairs', 'one-vs-rest', 'pooled', or contrasts like 'SZ/F+SZ/M vs HC/F+HC/M'",
    )
    p.add_argument("--sep", default="/", help="pooled: split group names at SEP (default '/')")
    p.add_argument("--level", type=int, default=0, help="pooled: which part names the pool")
    p.add_argument("--method", choices=["welch", "paired"], default="welch")
    p.add_argument("--correction", choices=["fdr", "cluster", "none"], default="fdr")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--permutations", type=int, default=1000, help="cluster: sign patterns")
    p.add_argument("--window", type=int, default=9, help="cluster: steps in the moving t (odd)")
    p.add_argument(
        "--statistic",
        choices=["t", "z"],
        default="z",
        help="cluster: moving t or self-normalised z",
    )
    p.add_argument("--block", type=int, default=1, help="cluster: steps flipped together")
    p.add_argument("--seed", type=int, default=0, help="cluster: seed of the sign patterns")
    p.add_argument("--max-rows", type=int, default=8, help="layers per PNG")
    p.add_argument("--dpi", type=int, default=110)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamspec", description="Inspect streamspec archives (Zarr v3)."
    )
    parser.add_argument("--version", action="version", version=f"streamspec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="summary of an archive: layers, groups, steps, epochs, size")
    info.add_argument("run", help="archive path or URL")
    info.set_defaults(func=cmd_info)

    report = sub.add_parser(
        "report", help="figures of one or more runs as PNG, with an index.html linking them"
    )
    report.add_argument("runs", nargs="+", metavar="RUN", help="archive paths or URLs")
    _add_report_options(report)
    report.set_defaults(func=cmd_report)

    compare = sub.add_parser(
        "compare", help="two runs side by side: trajectories and significance maps"
    )
    compare.add_argument("run_a", metavar="RUN_A")
    compare.add_argument("run_b", metavar="RUN_B")
    _add_report_options(compare)
    compare.set_defaults(func=cmd_compare)

    export = sub.add_parser("export", help="write a finished run as one zip file")
    export.add_argument("run", metavar="RUN")
    export.add_argument("output", metavar="OUT.zip")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except StreamspecError as error:
        print(f"streamspec: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
