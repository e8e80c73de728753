"""Remove training interactions from a prepared dataset, to measure models on sparser data.

    python launch/thin_train.py --data data/ml-100k --out /tmp/ml100k-cold --cold-items 0.5 --keep 2
    python launch/thin_train.py --data data/ml-100k --out /tmp/ml100k-25 --train-frac 0.25
    magnet-dist prepare --source parquet --path /tmp/ml100k-cold --out data/ml100k-cold
    magnet-dist content --data data/ml100k-cold

Two ways, both seeded: ``--cold-items F --keep K`` picks a random fraction F of the items and
keeps at most K of each one's training interactions (items with little history whose test
interactions stay); ``--train-frac F`` keeps a random fraction F of all training interactions.
Validation and test are unchanged and no user loses its last training interaction. The output is
``prepare --source parquet``'s input (the split column kept, the features copied), ids as in
the source dataset; ``cold_items.parquet`` lists the thinned items for per-group metrics.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magnet_dist.data.dataset import load_dataset  # noqa: E402
from magnet_dist.data.schema import FEATURES_DIR, INTERACTIONS_FILE  # noqa: E402
from magnet_dist.data.writer import folder_renamed_into_place  # noqa: E402
from magnet_dist.errors import MagnetError  # noqa: E402


def thin_train(
    data: Path,
    out: Path,
    cold_items: float | None = None,
    keep: int = 2,
    train_frac: float | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Write the thinned copy of ``data`` to ``out`` (a new folder); return the counts."""
    if (cold_items is None) == (train_frac is None):
        raise MagnetError("give exactly one of --cold-items and --train-frac")
    frac = cold_items if cold_items is not None else train_frac
    if not 0.0 < frac <= 1.0 or keep < 0:
        raise MagnetError(f"fractions are in (0, 1] and --keep >= 0 (got {frac}, {keep})")
    if out.exists():
        raise MagnetError(f"{out}: already exists; give a new folder")
    ds = load_dataset(data)
    table = pq.read_table(ds.path / INTERACTIONS_FILE)
    users, items, split = (table.column(c).to_numpy() for c in ("user_id", "item_id", "split"))
    rng = np.random.default_rng(seed)
    train = np.nonzero(split == 0)[0]
    left = np.bincount(users[train], minlength=ds.num_users)  # training rows per user
    drop = np.zeros(len(users), dtype=bool)
    cold = np.zeros(ds.num_items, dtype=bool)
    if cold_items is not None:
        cold[rng.permutation(ds.num_items)[: int(cold_items * ds.num_items)]] = True
        kept = np.zeros(ds.num_items, dtype=np.int64)
        for row in rng.permutation(train):  # a cold item keeps the first K rows it meets
            item, user = items[row], users[row]
            if not cold[item]:
                continue
            if kept[item] < keep or left[user] <= 1:  # never a user's last training row
                kept[item] += 1
            else:
                drop[row] = True
                left[user] -= 1
    else:
        drop[train] = rng.random(len(train)) >= train_frac
        kept_by_user = np.bincount(users[train[~drop[train]]], minlength=ds.num_users)
        for user in np.nonzero((left > 0) & (kept_by_user == 0))[0]:  # one row back each
            drop[rng.choice(train[users[train] == user])] = False
    # a failure halfway (disk full, Ctrl-C) leaves nothing partial behind
    with folder_renamed_into_place(out) as tmp:
        pq.write_table(table.filter(pa.array(~drop)), tmp / INTERACTIONS_FILE)
        shutil.copytree(ds.path / FEATURES_DIR, tmp / FEATURES_DIR)
        if cold_items is not None:
            cold_ids = pa.table({"item_id": np.nonzero(cold)[0]})
            pq.write_table(cold_ids, tmp / "cold_items.parquet")
    kept_train = np.bincount(items[(split == 0) & ~drop], minlength=ds.num_items)
    return {
        "train_before": int(len(train)),
        "train_after": int(len(train) - drop.sum()),
        "cold_items": int(cold.sum()),
        "items_without_train": int((kept_train == 0).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared dataset folder")
    parser.add_argument("--out", type=Path, required=True, help="new folder (parquet input)")
    parser.add_argument("--cold-items", type=float, default=None, help="fraction of items thinned")
    parser.add_argument("--keep", type=int, default=2, help="training rows kept per thinned item")
    parser.add_argument("--train-frac", type=float, default=None, help="fraction of train kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = thin_train(
            args.data, args.out, args.cold_items, args.keep, args.train_frac, args.seed
        )
    except MagnetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
