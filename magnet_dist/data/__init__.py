"""Dataset layer: the on-disk format, its reader, validation, and the four sources.

``load_dataset(path)`` opens a prepared folder; ``prepare_dataset(source, out, ...)`` (and
``magnet-dist prepare``) builds one. See :mod:`magnet_dist.data.schema` for the format.
"""

from magnet_dist.data.dataset import Dataset, load_dataset
from magnet_dist.data.prepare import prepare_dataset

__all__ = ["Dataset", "load_dataset", "prepare_dataset"]
