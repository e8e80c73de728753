"""Storage URIs (train.storage_path) and filesystem paths of the distributed trainer.

Ray Train writes checkpoints through pyarrow.fs, so its storage may be a URI; the dataset, the
partitions and the run folder are plain files (DGL, Parquet, metrics) and must be paths. A
URI must never turn into a local path such as ``<cwd>/s3:/bucket/x`` (regression).
"""

from __future__ import annotations

import pyarrow.fs
import pytest

from magnet_dist.config import load_config
from magnet_dist.errors import MagnetError
from magnet_dist.train.distributed import ray_storage_path, storage_filesystem, with_absolute_paths


def test_object_store_uri_reaches_ray_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_config(overrides=["train.storage_path=s3://bucket/x"]))
    assert cfg.train.storage_path == "s3://bucket/x"
    assert not (tmp_path / "s3:").exists()


def test_file_uri_is_the_local_path_it_names(tmp_path):
    assert ray_storage_path(f"file://{tmp_path}/ray%20results") == str(tmp_path / "ray results")
    fs, path = storage_filesystem(ray_storage_path(f"file://{tmp_path}"))
    assert isinstance(fs, pyarrow.fs.LocalFileSystem) and path == str(tmp_path)


def test_uri_schemes_pyarrow_cannot_open_are_refused():
    with pytest.raises(MagnetError, match="does not handle ftp://"):
        ray_storage_path("ftp://host/x")
    with pytest.raises(MagnetError, match="file:///abs/path"):
        ray_storage_path("file://otherhost/x")


@pytest.mark.parametrize("key", ["data.path", "graph.partition_dir", "train.run_dir"])
def test_uris_where_files_are_written_directly_are_refused(key):
    cfg = load_config(overrides=[f"{key}=s3://bucket/x"])
    with pytest.raises(MagnetError, match=f"{key}=s3://bucket/x is a URI"):
        with_absolute_paths(cfg)
