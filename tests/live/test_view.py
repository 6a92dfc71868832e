"""The live table, the epoch line and the live display, rendered to strings."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from rich.console import Console

from streamspec.errors import StreamspecError
from streamspec.layout import RunLayout
from streamspec.live import LiveView, Snapshot, epoch_line, render_table
from streamspec.live.view import ellipsize_left, format_t

LONG = "model.encoder.transformer.blocks.layers.3.fc1.weight"
LAYOUT = RunLayout(layers=("fc1.weight", LONG, "head.weight"), groups=("HC", "SZ"), rank=2)


def make_snapshot(layout: RunLayout = LAYOUT, *, seed: int = 0, **kwargs) -> Snapshot:
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.5, 9.5, size=layout.step_shape).astype(np.float32)
    welch_t = rng.uniform(-1.5, 1.5, size=layout.pair_shape)
    if layout is LAYOUT:
        sigma[0, 0, 0, 0] = 1.2345  # fc1.weight, activation, HC
        sigma[2, 1, 1, 0] = np.nan  # head.weight, adjoint, SZ: unknown
        welch_t[0, 0, 0, 0] = 5.21  # fc1.weight, activation, HC vs SZ
        welch_t[1, 2, 0, 0] = -2.46
        welch_t[2, 1, 0, 0] = np.nan
    fields = dict(step=119, epoch=3, steps_in_epoch=40, store="runs/a.zarr", elapsed_s=3725.0)
    fields.update(kwargs)
    return Snapshot(layout=layout, sigma=sigma, welch_t=welch_t, **fields)  # type: ignore[arg-type]


def render(renderable, width: int = 120, **console_kwargs) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, **console_kwargs)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


# --- render_table --------------------------------------------------------------------------------


def test_table_shows_layers_groups_values_and_progress():
    text = render(render_table(make_snapshot()))
    for expected in ("fc1.weight", "head.weight", "HC", "SZ", "HC–SZ", "act", "adj", "grad"):
        assert expected in text
    assert "1.23" in text  # σ₁ with 3 significant digits
    assert "5.2" in text and "-2.5" in text  # t with one decimal
    assert "–" in text.replace("HC–SZ", "")  # NaN σ and NaN t
    assert "step 119" in text and "epoch 3" in text and "40 steps" in text
    assert "1:02:05" in text and "runs/a.zarr" in text
    assert "\x1b[" not in text  # no escape codes on a no-colour console


def test_long_layer_names_keep_their_tail():
    text = render(render_table(make_snapshot(), name_width=24))
    assert ellipsize_left(LONG, 24) == "…cks.layers.3.fc1.weight"
    assert "…" + LONG[-23:] in text
    assert LONG not in text


def test_max_layers_keeps_the_largest_t_and_says_how_many_are_left_out():
    text = render(render_table(make_snapshot(), max_layers=2))
    assert "2 of 3 layers shown" in text and "1 left out" in text
    # fc1.weight (|t| 5.2) and the long layer (|t| 2.5) beat head.weight (|t| ≤ 1.5)
    assert "fc1.weight" in text and "head.weight" not in text


def test_strong_t_is_coloured_on_colour_consoles():
    console = Console(file=io.StringIO(), width=120, color_system="standard", force_terminal=True)
    console.print(render_table(make_snapshot()))
    assert "\x1b[1;31m" in console.file.getvalue()  # type: ignore[attr-defined]


@pytest.mark.parametrize("width", [100, 120, 140])
def test_many_groups_fit_the_width(width):
    layout = RunLayout(
        layers=tuple(f"encoder.layers.{i}.fc{i}.weight" for i in range(40)),
        groups=("control", "schizophrenia", "bipolar", "other"),
        rank=3,
    )
    text = render(render_table(make_snapshot(layout), width=width), width=width)
    assert max(len(line) for line in text.splitlines()) <= width
    flat = " ".join(text.split())  # the caption wraps
    assert "columns hidden" in flat and "30 of 40 layers shown" in flat
    assert "t max" in text  # one column per pair, its strongest kind
    assert text.count("\n") < 45


def test_names_are_not_markup():
    layout = RunLayout(layers=("blocks[0].fc[bold]",), groups=("[red]A", "B"), rank=1)
    text = render(render_table(make_snapshot(layout, store="runs/[exp]/a.zarr")))
    assert "blocks[0].fc[bold]" in text and "[red]A" in text and "runs/[exp]/a.zarr" in text


def test_empty_snapshot_renders():
    text = render(render_table(Snapshot.empty(LAYOUT)))
    assert "no step recorded yet" in text and "fc1.weight" in text


def test_format_t_is_compact():
    assert [format_t(x) for x in (np.nan, 5.21, -1234.0, np.inf, -np.inf)] == [
        "–",
        "5.2",
        "-1e+03",
        "inf",
        "-inf",
    ]


# --- epoch_line ----------------------------------------------------------------------------------


def test_epoch_line_names_the_largest_t():
    line = epoch_line(make_snapshot())
    assert line == (
        "streamspec epoch 3: 40 steps, 3 layers; "
        "max |t| 5.2 (fc1.weight activation σ1 HC vs SZ); archive runs/a.zarr"
    )


def test_epoch_line_without_tests_or_archive():
    line = epoch_line(Snapshot.empty(LAYOUT))
    assert "no Welch t yet" in line and "no archive" in line and "\n" not in line


# --- LiveView ------------------------------------------------------------------------------------


def terminal() -> Console:
    return Console(file=io.StringIO(), width=120, force_terminal=True, color_system=None)


def wait_for(condition, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_live_view_renders_on_a_background_thread_and_stops_twice():
    threads = set()
    snap = make_snapshot()

    def get_snapshot():
        threads.add(threading.current_thread())
        return snap

    console = terminal()
    view = LiveView(get_snapshot, console=console, refresh_per_second=10)
    assert view.refresh_per_second == 2.0  # capped
    view.start()
    view.start()  # no second display
    # (for a snapshot read, not view.frames: rich's thread counts the frame before it reads)
    assert wait_for(lambda: threads)
    before_stop = set(threads)
    view.stop()
    view.stop()
    assert not view.running
    assert before_stop and threading.main_thread() not in before_stop  # rich's thread renders
    assert "fc1.weight" in console.file.getvalue()  # type: ignore[attr-defined]


def test_live_view_waits_for_the_first_step():
    console = terminal()
    with LiveView(lambda: None, console=console):
        pass
    assert "waiting for the first step" in console.file.getvalue()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "get_snapshot",
    [lambda: (_ for _ in ()).throw(RuntimeError("boom")), lambda: "not a snapshot"],
    ids=["get_snapshot raises", "render raises"],
)
def test_live_view_errors_never_propagate(get_snapshot):
    console = terminal()
    view = LiveView(get_snapshot, console=console)
    with view:
        assert wait_for(lambda: view.frames >= 1)
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert "live view could not render" in output


def test_live_view_off_terminal_prints_one_frame_at_stop():
    console = Console(file=io.StringIO(), width=120, color_system=None)
    with LiveView(make_snapshot, console=console):
        pass
    assert console.file.getvalue().count("head.weight") == 1  # type: ignore[attr-defined]


def test_refresh_rate_must_be_positive():
    with pytest.raises(StreamspecError, match="refresh_per_second"):
        LiveView(lambda: None, refresh_per_second=0)
