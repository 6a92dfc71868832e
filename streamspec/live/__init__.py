"""Live views of a run: rich renderables fed by a :class:`Snapshot`; no training logic here."""

from streamspec.live.snapshot import Snapshot
from streamspec.live.view import LiveView, epoch_line, render_table

__all__ = ["LiveView", "Snapshot", "epoch_line", "render_table"]
