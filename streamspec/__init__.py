"""streamspec: live, low-overhead spectral introspection of training, split by groups of samples.

>>> mon = streamspec.watch(model, groups=["HC", "SZ"], rank=16, store="runs/a.zarr")
>>> ds = streamspec.open("runs/a.zarr").to_xarray()
"""

from streamspec._version import __version__
from streamspec.errors import StreamspecError, StreamspecWarning
from streamspec.monitor import Monitor, validate, watch
from streamspec.store.reader import Archive
from streamspec.store.reader import open_archive as open  # noqa: A001  (streamspec.open(path))

__all__ = [
    "Archive",
    "Monitor",
    "StreamspecError",
    "StreamspecWarning",
    "__version__",
    "open",
    "validate",
    "watch",
]
