"""Rich renderables of a :class:`~streamspec.live.snapshot.Snapshot`, and the live display.

Rendering is pull-based: :class:`LiveView` hands rich a callable that fetches the latest snapshot,
so frames are drawn on rich's refresh thread at ≤ 2 Hz and the training thread only swaps in a new
snapshot. A 30–40-row table costs 14–26 ms per frame, hence the low rate and the ``max_layers``
cut.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import numpy as np
from rich import box
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from streamspec.errors import StreamspecError
from streamspec.layout import KINDS, pair_indices
from streamspec.live.snapshot import Snapshot

__all__ = ["LiveView", "epoch_line", "render_table"]

KIND_ABBREV: dict[str, str] = {"activation": "act", "adjoint": "adj", "gradient": "grad"}
MISSING = "–"
T_STRONG = 3.0  # |t| shown bold red
T_NOTABLE = 2.0  # |t| shown yellow
_SIGMA_WIDTH = 8  # "1.23e-05"
_T_WIDTH = 6  # "-999.9", "-1e+03"
_COLUMN_OVERHEAD = 2  # the divider and the right padding


def ellipsize_left(text: str, width: int) -> str:
    """Keep the tail of ``text`` (the informative end of a layer path) within ``width``."""
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1 :] if width > 1 else "…"


def _ellipsize_right(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_sigma(x: float) -> str:
    """Compact singular value: 3 significant digits, ``–`` for NaN."""
    return MISSING if math.isnan(x) else f"{x:.3g}"


def format_t(x: float) -> str:
    """Compact t statistic, at most 6 characters; ``–`` for NaN."""
    if math.isnan(x):
        return MISSING
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.1f}" if abs(x) < 999.95 else f"{x:.0e}"


def _t_style(x: float) -> str:
    if math.isnan(x):
        return "dim"
    if abs(x) >= T_STRONG:
        return "bold red"
    if abs(x) >= T_NOTABLE:
        return "yellow"
    return ""


def format_elapsed(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour)."""
    if not math.isfinite(seconds) or seconds < 0:
        return MISSING
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _max_abs(values: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """max |t| over ``axis`` with NaN as -1 (below any real |t|) and without all-NaN warnings."""
    return np.where(np.isnan(values), -1.0, np.abs(values)).max(axis=axis, initial=-1.0)


def _select_layers(snap: Snapshot, max_layers: int) -> np.ndarray:
    """Indices of the layers to show, in model order: all, or the ``max_layers`` of largest max |t|
    of σ₁ (model order breaks ties, so before any t the first layers are shown)."""
    n_layers = len(snap.layout.layers)
    if n_layers <= max_layers:
        return np.arange(n_layers)
    score = _max_abs(snap.welch_t[:, :, :, 0], axis=(1, 2))
    top = np.argsort(-score, kind="stable")[:max_layers]
    return np.sort(top)


def _title(snap: Snapshot) -> str:
    if snap.step < 0:
        head = "streamspec · no step recorded yet"
    else:
        head = (
            f"streamspec · step {snap.step} · epoch {snap.epoch} "
            f"({snap.steps_in_epoch} steps so far)"
        )
    return f"{head} · {format_elapsed(snap.elapsed_s)} elapsed"


@dataclass
class _Column:
    header: str
    cells: list[Text]
    width: int  # fixed, so the table does not jitter as values change between frames
    # Columns that do not fit are dropped, all those of the highest drop order at a time.
    drop_order: tuple[int, int]


def _pair_head(a: str, b: str) -> str:
    head = f"{a}–{b}"
    return head if len(head) <= 9 else f"{_ellipsize_right(a, 8)}–\n{_ellipsize_right(b, 8)}"


def render_table(
    snap: Snapshot, *, max_layers: int = 30, width: int | None = None, name_width: int = 32
) -> Table:
    """The live table: current σ₁ per group and the epoch's Welch t of σ₁ per pair, per layer.

    Columns: the layer (long names keep their tail: ``…layers.3.fc1.weight``); σ₁ of the last
    step per group and kind (act/adj/grad); then the Welch t of σ₁ over the epoch so far per pair
    and kind, coloured by |t| (bold red ≥ 3, yellow ≥ 2; no-colour consoles drop the colour).
    When ``width`` is given and the table would not fit: each pair first gets one column with
    its largest-|t| kind instead of three; then σ₁ columns are left out (adjoint and gradient
    first), then t columns; the caption says what is hidden.

    Args:
        snap: What to show.
        max_layers: Most rows; with more layers, those with the largest max |t| of σ₁ are shown
            (in model order) and the caption says how many were left out.
        width: Columns available (e.g. ``console.width``); None to show every column.
        name_width: Most characters of a layer name.

    Returns:
        A rich Table with the run's progress as title and notes as caption.
    """
    layout = snap.layout
    groups, pairs = layout.groups, pair_indices(len(layout.groups))
    kinds = [KIND_ABBREV.get(k, k) for k in KINDS]
    rows = _select_layers(snap, max(1, max_layers))
    names = [ellipsize_left(layout.layers[i], name_width) for i in rows]
    # From every layer, not the shown ones, so the column does not jump when the selection does.
    name_col = min(name_width, max([len("layer"), *(len(n) for n in layout.layers)]))

    def header_width(header: str) -> int:
        return max(len(line) for line in header.split("\n"))

    sigma_columns = []
    for g, group in enumerate(groups):
        for k, kind in enumerate(kinds):
            header = f"{_ellipsize_right(group, 8)}\nσ₁ {kind}"
            sigma_columns.append(
                _Column(
                    header,
                    [Text(format_sigma(float(snap.sigma[i, k, g, 0]))) for i in rows],
                    max(header_width(header), _SIGMA_WIDTH),
                    # all gradient columns first, then all adjoint ones, then the
                    # activations of the last groups; t columns only after every σ₁ column
                    (k + 1, 0) if k else (1, g),
                )
            )

    def t_columns(strongest: bool) -> list[_Column]:
        t1 = snap.welch_t[:, :, :, 0]  # [layer, kind, pair]
        best = np.argmax(np.where(np.isnan(t1), -1.0, np.abs(t1)), axis=1)  # [layer, pair]
        columns = []
        for p, (a, b) in enumerate(pairs):
            for k, kind in enumerate(kinds):
                if strongest and k:
                    break
                cells = []
                for i in rows:
                    kk = int(best[i, p]) if strongest else k
                    x = float(t1[i, kk, p])
                    tag = f" {kinds[kk]}" if strongest and not math.isnan(x) else ""
                    cells.append(Text(format_t(x) + tag, style=_t_style(x)))
                header = f"{_pair_head(groups[a], groups[b])}\nt {'max' if strongest else kind}"
                content = _T_WIDTH + (5 if strongest else 0)
                columns.append(_Column(header, cells, max(header_width(header), content), (0, p)))
        return columns

    def fits(columns: list[_Column]) -> bool:
        needed = name_col + sum(c.width + _COLUMN_OVERHEAD for c in columns)
        return width is None or needed <= width

    notes: list[str] = []
    columns = sigma_columns + t_columns(strongest=False)
    if not fits(columns) and len(layout.kinds) > 1:
        columns = sigma_columns + t_columns(strongest=True)
        notes.append("t: kind of largest |t| per pair")
    hidden = 0
    while columns and not fits(columns):
        drop = max(c.drop_order for c in columns)
        hidden += sum(c.drop_order == drop for c in columns)
        columns = [c for c in columns if c.drop_order != drop]
    if hidden:
        notes.append(f"{hidden} columns hidden (widen the terminal)")
    if len(rows) < len(layout.layers):
        notes.append(
            f"{len(rows)} of {len(layout.layers)} layers shown (largest |t|), "
            f"{len(layout.layers) - len(rows)} left out"
        )
    notes.append("σ₁: last step · t: Welch t of σ₁, epoch so far")
    if snap.store:
        notes.append(f"archive {ellipsize_left(snap.store, 60)}")

    # Text, never str: layer, group and store names must not be parsed as rich markup.
    table = Table(
        title=Text(_title(snap)),
        caption=Text(" · ".join(notes)),
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1, 0, 0),
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("layer", no_wrap=True, overflow="ellipsis", width=name_col)
    for column in columns:
        table.add_column(
            Text(column.header, justify="right"),
            justify="right",
            no_wrap=True,
            overflow="ellipsis",
            width=column.width,
        )
    for r, name in enumerate(names):
        table.add_row(Text(name), *(column.cells[r] for column in columns))
    return table


def epoch_line(snap: Snapshot) -> str:
    """One plain line (no markup) summarising the epoch so far, for logs and non-terminals.

    Example: ``streamspec epoch 3: 120 steps, 12 layers; max |t| 5.2 (fc1.weight activation σ1
    HC vs SZ); archive runs/a.zarr``.
    """
    layout = snap.layout
    head = (
        f"streamspec epoch {snap.epoch}: {snap.steps_in_epoch} steps, {len(layout.layers)} layers"
    )
    t = snap.welch_t
    if t.size and not np.isnan(t).all():
        layer, kind, pair, rank = np.unravel_index(
            int(np.argmax(np.where(np.isnan(t), -1.0, np.abs(t)))), t.shape
        )
        where = f"{layout.layers[layer]} {KINDS[kind]} σ{rank + 1} {layout.pairs[pair]}"
        strongest = f"max |t| {format_t(abs(float(t[layer, kind, pair, rank])))} ({where})"
    else:
        strongest = "no Welch t yet"
    archive = f"archive {snap.store}" if snap.store else "no archive"
    return f"{head}; {strongest}; {archive}"


class _Guarded:
    """Renders ``make()`` fully, or one dim line saying why it could not: a broken frame must
    never raise on rich's refresh thread (or, at stop, on the training thread)."""

    def __init__(self, make: Callable[[], RenderableType]):
        self._make = make

    def _failure(self, error: BaseException) -> Text:
        message = f"streamspec: live view could not render ({type(error).__name__}: {error})"
        return Text(_ellipsize_right(message, 200), style="dim")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        try:
            # Rendered to segments here so that an error half-way leaves nothing half-printed.
            segments = list(console.render(self._make(), options))
        except Exception as error:
            segments = list(console.render(self._failure(error), options))
        yield from segments

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(1, options.max_width)


class LiveView:
    """A terminal display of the latest snapshot, refreshed on rich's thread at ≤ 2 Hz.

    The training thread only publishes snapshots (whatever ``get_snapshot`` reads); drawing,
    formatting and any error in them stay on rich's daemon thread. Not a terminal: rich prints one
    frame at :meth:`stop` (use :func:`epoch_line` for logs).

    Args:
        get_snapshot: Returns the latest snapshot, or None before the first step. Called from
            rich's refresh thread; exceptions are shown in the display, never raised.
        console: Where to draw; rich's default console (stdout) when None.
        refresh_per_second: Frame rate, capped at 2.
        max_layers: Most table rows (see :func:`render_table`).

    Example:
        >>> with LiveView(lambda: monitor.snapshot):  # doctest: +SKIP
        ...     train()
    """

    def __init__(
        self,
        get_snapshot: Callable[[], Snapshot | None],
        *,
        console: Console | None = None,
        refresh_per_second: float = 2.0,
        max_layers: int = 30,
    ):
        if not refresh_per_second > 0:
            raise StreamspecError.build(
                "refresh_per_second > 0",
                repr(refresh_per_second),
                "pass e.g. refresh_per_second=1.0",
            )
        self._get_snapshot = get_snapshot
        self.console = console if console is not None else Console()
        self.refresh_per_second = min(2.0, float(refresh_per_second))
        self.max_layers = max_layers
        self._live: Live | None = None
        self._lock = threading.Lock()
        self.frames = 0  # rendered frames, for tests and diagnostics

    def _frame(self) -> RenderableType:
        self.frames += 1
        snap = self._get_snapshot()
        if snap is None:
            return Text("streamspec: waiting for the first step…", style="dim")
        return render_table(snap, max_layers=self.max_layers, width=self.console.width)

    def _renderable(self) -> RenderableType:
        return _Guarded(self._frame)

    @property
    def running(self) -> bool:
        return self._live is not None

    def start(self) -> LiveView:
        """Start the display (no-op when already running). Returns self."""
        with self._lock:
            if self._live is None:
                live = Live(
                    get_renderable=self._renderable,
                    console=self.console,
                    refresh_per_second=self.refresh_per_second,
                    transient=False,
                    # No stream swapping: the training thread's prints would then wait on the
                    # render lock; and ours must not change the user's sys.stdout/err.
                    redirect_stdout=False,
                    redirect_stderr=False,
                )
                live.start()
                self._live = live
        return self

    def stop(self) -> None:
        """Draw the last frame and stop (idempotent; errors are swallowed, training goes on)."""
        with self._lock:
            live, self._live = self._live, None
        if live is not None:
            # A display failure (closed terminal, broken pipe) must not end training.
            with contextlib.suppress(Exception):
                live.stop()

    def __enter__(self) -> LiveView:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
