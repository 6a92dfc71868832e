"""The one error class and the one warning class of streamspec."""

from __future__ import annotations


class StreamspecError(ValueError):
    """A usage error: the message says what was expected, what was got, and how to fix it."""

    @classmethod
    def build(cls, expected: str, got: str, fix: str) -> StreamspecError:
        """Make an error whose message reads ``expected …; got …. Fix: …``."""
        return cls(f"expected {expected}; got {got}. Fix: {fix}")


class StreamspecWarning(UserWarning):
    """Something streamspec noticed and recorded (e.g. NaN in a layer) without stopping training."""
