"""The one error class and the one warning class of streamspec."""

from __future__ import annotations

import sys


class StreamspecError(ValueError):
    """A usage error: the message says what was expected, what was got, and how to fix it."""

    @classmethod
    def build(cls, expected: str, got: str, fix: str) -> StreamspecError:
        """Make an error whose message reads ``expected …; got …. Fix: …``."""
        return cls(f"expected {expected}; got {got}. Fix: {fix}")


class StreamspecWarning(UserWarning):
    """Something streamspec noticed and recorded (e.g. NaN in a layer) without stopping training."""


def outside_stacklevel() -> int:
    """``warnings.warn``'s ``stacklevel`` for the first caller outside streamspec, from the
    function that calls this (a warning raised deep inside points at the user's line)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("streamspec"):
        frame, level = frame.f_back, level + 1
    return level
