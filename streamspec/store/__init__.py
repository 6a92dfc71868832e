"""The archive: a Zarr v3 group written in blocks by a background thread, read to commit marks.

``ArchiveWriter`` buffers rows and writes them off the training thread; ``open_archive`` returns
an ``Archive`` whose ``to_xarray()`` holds only committed rows, from this or another process, and
whose ``check()`` verifies every chunk; ``export_archive`` writes a run as one read-only ``.zip``.
The arrays and their dimensions are declared in :mod:`streamspec.store.schema`.
"""

from streamspec.store.export import export_archive
from streamspec.store.reader import Archive, EpochSteps, open_archive
from streamspec.store.writer import ArchiveWriter

__all__ = ["Archive", "ArchiveWriter", "EpochSteps", "export_archive", "open_archive"]
