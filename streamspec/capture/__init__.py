"""Capture: hooks that collect activation and adjoint rows, one file per layer family."""

from streamspec.capture import linear as _linear  # noqa: F401  (registers nn.Linear)
from streamspec.capture.registry import Capture, Family, Site, family_of, register

__all__ = ["Capture", "Family", "Site", "family_of", "register"]
