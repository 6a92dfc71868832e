"""How streamspec's device work runs: in IEEE float32, outside the user's autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch

from streamspec.sketch.linalg import ieee_float32

_is_autocast_enabled = torch.is_autocast_enabled  # (device_type) from PyTorch 2.4 on


def as_written(
    devices: Iterable[torch.device | None], conv: bool = True
) -> contextlib.AbstractContextManager[Any]:
    """streamspec's device work on ``devices`` as it is written: autocast off for their device
    types (a hook or an end-of-backward callback inherits the user's autocast region) and IEEE
    float32 products (:func:`ieee_float32`; ``conv=False`` for work without convolutions)."""
    precision = ieee_float32(conv)
    autocast = [
        kind for kind in sorted({d.type for d in devices if d is not None}) if _autocast_on(kind)
    ]
    if not autocast:  # the usual case, on every layer and step: no ExitStack
        return precision
    stack = contextlib.ExitStack()
    for kind in autocast:
        stack.enter_context(torch.autocast(device_type=kind, enabled=False))
    stack.enter_context(precision)
    return stack


def _autocast_on(kind: str) -> bool:
    """Whether autocast is on for a device type; True where PyTorch cannot say (before 2.4,
    ``is_autocast_enabled`` took no device type): then it is switched off as if it were."""
    try:
        return bool(_is_autocast_enabled(kind))
    except (TypeError, RuntimeError):
        return True
