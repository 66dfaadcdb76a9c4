"""Where ingest reads images from: one module per ``data.source``, picked by :func:`load_source`.

Each source returns a :class:`~stages.sources.raw.RawData` (the raw-data contract, checked by
:func:`~stages.sources.raw.validate_raw` before anything is written).
"""

from __future__ import annotations

from stages.errors import UserError
from stages.params import DataParams
from stages.sources.raw import RawData


def load_source(p: DataParams) -> RawData:
    """Read the data set named by ``data.source`` (only that source's module is imported)."""
    if p.source == "synthetic":
        from stages.sources.synthetic import load_synthetic

        return load_synthetic(p.synthetic)
    if p.source == "cifar10":
        from stages.sources.cifar10 import load_cifar10

        return load_cifar10(p.path, p.url, p.sha256)
    if p.source == "npz":
        from stages.sources.npz import load_npz

        return load_npz(p.path)
    if p.source == "imagefolder":
        from stages.sources.imagefolder import load_imagefolder

        return load_imagefolder(p.path)
    raise UserError(f"data.source: unknown source '{p.source}'")  # the schema prevents this
