"""``magnet-dist evaluate``: Recall/NDCG@K of a trained run's best checkpoint.

Exact mode is MMRec's protocol (every item ranked, only training items masked), the numbers the
trainer writes to ``metrics.json``. Two-stage mode (catalogues above
``eval.two_stage_above_items`` items in ``--mode auto``) retrieves ``eval.candidates`` items per
user by dot score through HNSW and re-ranks them with the full score (dot + MoE); its output
says ``"two_stage": true`` and carries ``retrieval_recall@N`` (how much of the exact dot-product
top-N the retrieval finds, on a user sample), so it is never mistaken for the exact metric.
``--sample-users N`` adds exact metrics on N sampled users (``<split>.exact_sample.*``, with the
two-stage numbers of the same users as ``<split>.two_stage_sample.*``) to compare the two.
``--items FILE`` ranks among the listed items only (e.g. ``cold_items.parquet`` of
launch/thin_train.py), for the users with a listed item in the split: ``<split>.on_items.*``,
always exact.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from magnet_dist.atomic import write_text_atomic
from magnet_dist.errors import MagnetError
from magnet_dist.eval.model_io import (
    LoadedRun,
    add_ranking_arguments,
    candidate_score_fn,
    load_run,
    retrieve_for,
)
from magnet_dist.eval.recommend import read_item_list

SPLITS = {"valid": 1, "test": 2}
RETRIEVAL_RECALL_USERS = 1000  # users checked against exact retrieval when --sample-users unset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (config.yaml + checkpoints/)")
    parser.add_argument(
        "--split", choices=["valid", "test", "both"], default="both", help="split(s) to evaluate"
    )
    add_ranking_arguments(
        parser,
        candidates_help="two-stage: candidates N retrieved per user (None: eval.candidates of the run)",
    )
    parser.add_argument(
        "--sample-users",
        type=int,
        default=None,
        help="also compute exact metrics on this many sampled users per split (two-stage: to "
        "compare; exact: instead of all users) and check retrieval recall on them; None: all "
        "users, retrieval recall on 1000",
    )
    parser.add_argument(
        "--items",
        default=None,
        help="rank among these items only, for the users with one of them in the split (exact "
        "ranking): a Parquet file (column item_id, else its only column), a text file or a "
        "comma-separated list; None: every item",
    )
    parser.add_argument(
        "--original-ids",
        action="store_true",
        help="--items holds the source's item ids (the dataset's id map), not internal ids",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the user samples")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the metrics here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def sample_users(users: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    if n is None or n >= len(users):
        return users
    return np.sort(np.random.default_rng(seed).choice(users, n, replace=False))


def evaluate_run(
    loaded: LoadedRun,
    splits: list[str],
    mode: str = "auto",
    candidates: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    progress: bool = False,
    items: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of ``loaded`` on ``splits`` (see the module docstring for the keys); with
    ``items`` (internal ids), among those items only."""
    from magnet_dist.eval.ranking import rank_candidates, retrieval_recall
    from magnet_dist.eval.scoring import SplitEvaluator, listed_reps, ranking_score_fn

    if sample is not None and sample < 1:
        raise MagnetError(f"--sample-users must be >= 1, got {sample}")
    cfg, ds = loaded.cfg, loaded.dataset
    ev_cfg = cfg.eval
    if items is not None and mode == "two-stage":
        raise MagnetError("--items ranks exactly among the listed items; use --mode exact or auto")
    two_stage = items is None and loaded.use_two_stage(mode)
    evaluators = {
        s: SplitEvaluator(ds, SPLITS[s], ev_cfg.ks, ev_cfg.user_chunk, ev_cfg.item_chunk, items)
        for s in splits
    }
    tag = ".on_items" if items is not None else ""
    item_reps = loaded.item_reps if items is None else listed_reps(loaded.item_reps, items)
    exact_fn = ranking_score_fn(loaded.model, loaded.user_reps, item_reps)
    out: dict[str, Any] = {
        "run": str(loaded.run_dir),
        "checkpoint_epoch": loaded.epoch,
        "mode": "two-stage" if two_stage else "exact",
        "two_stage": two_stage,
        "num_users": ds.num_users,
        "num_items": ds.num_items,
    }
    if items is not None:
        out["on_items"] = len(items)
    t0 = time.time()
    if not two_stage:
        for s, ev in evaluators.items():
            if items is not None:
                out[f"{s}{tag}.users"] = len(ev.users)
            if sample is None:
                out.update(ev.sums(exact_fn, progress=progress).metrics(f"{s}{tag}"))
            else:
                users = sample_users(ev.users, sample, seed)
                out.update(ev.sums(exact_fn, users, progress).metrics(f"{s}{tag}.exact_sample"))
                out[f"{s}{tag}.sample_users"] = len(users)
        out["eval_seconds"] = time.time() - t0
        return out

    n = candidates if candidates is not None else ev_cfg.candidates
    if n < 1:
        raise MagnetError(f"--candidates must be >= 1, got {n}")
    n = min(n, ds.num_items)
    train = next(iter(evaluators.values())).train_mask
    all_users = np.unique(np.concatenate([ev.users for ev in evaluators.values()]))
    user_vecs, item_vecs = loaded.retrieval_vectors()
    cand = retrieve_for(loaded, all_users, n, train, progress, user_vecs, item_vecs)
    pair_fn = candidate_score_fn(loaded.model, loaded.user_reps, loaded.item_reps)

    def two_stage_sums(ev, users):
        rows = np.searchsorted(all_users, users)
        return rank_candidates(
            pair_fn,
            users,
            cand[rows],
            ev.ground_truth,
            ev.train_mask,
            ev_cfg.ks,
            ev_cfg.user_chunk,
            progress,
        )

    out["candidates"] = n
    for s, ev in evaluators.items():
        out.update(two_stage_sums(ev, ev.users).metrics(s))
        if sample is not None:
            users = sample_users(ev.users, sample, seed)
            out.update(ev.sums(exact_fn, users, progress).metrics(f"{s}.exact_sample"))
            out.update(two_stage_sums(ev, users).metrics(f"{s}.two_stage_sample"))
            out[f"{s}.sample_users"] = len(users)
    rr_users = min(sample or RETRIEVAL_RECALL_USERS, len(all_users))
    out[f"retrieval_recall@{n}"] = retrieval_recall(
        user_vecs[all_users],
        item_vecs,
        n,
        rr_users,
        users=all_users,
        exclude=train,
        candidates=cand,
        seed=seed,
        item_chunk=ev_cfg.item_chunk,
    )
    out["retrieval_recall_users"] = rr_users
    out["eval_seconds"] = time.time() - t0
    return out


def main(args: argparse.Namespace) -> int:
    progress = not args.quiet and sys.stderr.isatty()
    splits = ["valid", "test"] if args.split == "both" else [args.split]
    loaded = load_run(args.run, args.data, quiet=args.quiet, any_dataset=args.any_dataset)
    ds = loaded.dataset
    items = None if args.items is None else read_item_list(args.items, ds, args.original_ids)
    metrics = evaluate_run(
        loaded, splits, args.mode, args.candidates, args.sample_users, args.seed, progress, items
    )
    print(
        f"[evaluate] {loaded.run_dir} (best epoch {loaded.epoch}) on {ds.path}: "
        f"{ds.num_users} users, {ds.num_items} items, {metrics['mode']} ranking"
    )
    if metrics["two_stage"]:
        n = metrics["candidates"]
        print(
            f"[evaluate] TWO-STAGE: {n} HNSW candidates per user by dot score, re-ranked with the "
            "MoE score; these are NOT the exact full-ranking metrics. Retrieval recall@"
            f"{n} vs exact dot-product top-{n} on {metrics['retrieval_recall_users']} users: "
            f"{metrics[f'retrieval_recall@{n}']:.4f}"
        )
    elif args.sample_users is not None:
        print(f"[evaluate] exact metrics on a sample of at most {args.sample_users} users/split")
    if items is not None:
        users = ", ".join(f"{metrics[f'{s}.on_items.users']} in {s}" for s in splits)
        print(
            f"[evaluate] ranking among the {len(items)} items of --items only, for the users with "
            f"one of them in the split ({users}): keys <split>.on_items.*"
        )
    print(json.dumps(metrics, indent=2))
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(metrics, indent=2) + "\n")
    return 0
