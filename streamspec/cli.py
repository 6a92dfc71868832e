"""The ``streamspec`` command: look at archives from a terminal.

streamspec info RUN        layers, groups, steps, epochs, rank, normalisation, size, attributes
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from streamspec._version import __version__
from streamspec.errors import StreamspecError


def _size_on_disk(path: Path) -> int | None:
    if not path.exists():
        return None
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamspec", description="Inspect streamspec archives (Zarr v3)."
    )
    parser.add_argument("--version", action="version", version=f"streamspec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="summary of an archive: layers, groups, steps, epochs, size")
    info.add_argument("run", help="archive path or URL")
    info.set_defaults(func=cmd_info)
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
