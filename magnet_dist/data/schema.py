"""The on-disk dataset format: file names, Arrow schemas, split codes.

A dataset folder holds::

    interactions.parquet           user_id int64, item_id int64, [timestamp int64], split int8
    item_features/<modality>.parquet   item_id int64, feature fixed_size_list<float32>[d]
    id_map/users.parquet, id_map/items.parquet   index int64, original <source id type>
    manifest.json                  counts, splits, modalities {name: dim}, source, seed, checksum

Ids are 0-based and contiguous; feature files have one row per item, sorted by ``item_id``.
Interactions are sorted by (user_id, item_id) and hold no duplicate pairs.
"""

from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 1

MANIFEST_FILE = "manifest.json"
INTERACTIONS_FILE = "interactions.parquet"
FEATURES_DIR = "item_features"
ID_MAP_DIR = "id_map"

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")
SPLIT_CODES = {name: code for code, name in enumerate(SPLIT_NAMES)}

USER_COL = "user_id"
ITEM_COL = "item_id"
TIME_COL = "timestamp"
SPLIT_COL = "split"
FEATURE_COL = "feature"


def interactions_schema(with_timestamp: bool = False) -> pa.Schema:
    fields = [pa.field(USER_COL, pa.int64()), pa.field(ITEM_COL, pa.int64())]
    if with_timestamp:
        fields.append(pa.field(TIME_COL, pa.int64()))
    fields.append(pa.field(SPLIT_COL, pa.int8()))
    return pa.schema(fields)


def feature_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def features_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field(ITEM_COL, pa.int64()),
            pa.field(FEATURE_COL, feature_type(dim)),
        ]
    )


def features_file(modality: str) -> str:
    """Path of a modality's feature file, relative to the dataset folder."""
    return f"{FEATURES_DIR}/{modality}.parquet"


def split_code(split: int | str) -> int:
    """``0/1/2`` or ``"train"/"valid"/"test"`` -> the split code."""
    if isinstance(split, str):
        if split not in SPLIT_CODES:
            raise ValueError(f"unknown split {split!r}; use one of {SPLIT_NAMES}")
        return SPLIT_CODES[split]
    if int(split) not in (TRAIN, VALID, TEST):
        raise ValueError(f"unknown split {split!r}; use 0 (train), 1 (valid) or 2 (test)")
    return int(split)
