"""Capture: hooks that collect activation and adjoint rows, one file per layer family.

Each import below registers one family (``@register``); adding a family is one file and one line.
"""

from streamspec.capture import attention as _attention  # noqa: F401  nn.MultiheadAttention
from streamspec.capture import conv as _conv  # noqa: F401  nn.Conv1d/2d/3d
from streamspec.capture import embedding as _embedding  # noqa: F401  nn.Embedding
from streamspec.capture import linear as _linear  # noqa: F401  nn.Linear
from streamspec.capture import recurrent as _recurrent  # noqa: F401  nn.RNN/LSTM/GRU
from streamspec.capture.registry import Capture, Family, Site, family_of, register

__all__ = ["Capture", "Family", "Site", "family_of", "register"]
