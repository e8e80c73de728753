"""Load a trained run for inference: ``config.yaml`` + ``checkpoints/best.pt`` -> model and the
full-graph representations of every user and item, computed once.

Both ``magnet-dist evaluate`` and ``magnet-dist recommend`` go through :func:`load_run`. The
reference and the distributed trainer write the same best checkpoint (``{"model": MagnetModel
state_dict, "embeddings": {"weight": [num_users + num_items, d]}, "epoch"}``, users first), so
loading does not depend on the trainer mode. Also here: the scorers both commands share (pair
scores for re-ranking, the dot-product retrieval vectors) and the exact / two-stage choice.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from magnet_dist.config import Config, load_config
from magnet_dist.data.dataset import Dataset, load_dataset
from magnet_dist.errors import MagnetError
from magnet_dist.eval.ranking import CSR, csr_from_pairs
from magnet_dist.eval.scoring import SCORE_CHUNK_TOKENS, eval_mode
from magnet_dist.model.magnet import MagnetModel

Reps = dict[str, torch.Tensor]

MODES = ("auto", "exact", "two-stage")
BEST_CHECKPOINT = Path("checkpoints") / "best.pt"


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: Config  # the run's config, data.path pointing at the dataset actually loaded
    dataset: Dataset
    model: MagnetModel  # eval mode
    user_reps: Reps  # modality -> [num_users, d]
    item_reps: Reps  # modality -> [num_items, d]
    epoch: int | None  # epoch of the best checkpoint

    @property
    def num_users(self) -> int:
        return self.dataset.num_users

    @property
    def num_items(self) -> int:
        return self.dataset.num_items

    def train_csr(self) -> CSR:
        tu, ti = self.dataset.pairs(0)
        return csr_from_pairs(tu, ti, self.dataset.num_users)

    def retrieval_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(user, item) float32 vectors whose inner product is the model's dot score.

        ``dot_score = sum_m w_m <h_u^m, h_i^m>`` (``w_m = 1/M`` by default): concatenating h^m
        over modalities, each block scaled by ``sqrt|w_m|`` on both sides and by the sign of
        ``w_m`` on the user side, gives ``<u, i> = sum_m w_m <h_u^m, h_i^m>``. When the score is
        the ID dot alone (``score_weights=behaviour``) the vectors are the ID block alone, not M
        blocks of which M - 1 are zeros (an index M times narrower).
        """
        mods = self.model.modalities
        if self.model.behaviour_only:
            b = mods[0]
            u, i = self.user_reps[b], self.item_reps[b]
        elif self.model.cfg.model.score_weights == "mean":
            scale = 1.0 / math.sqrt(len(mods))
            u = torch.cat([self.user_reps[m] for m in mods], dim=1) * scale
            i = torch.cat([self.item_reps[m] for m in mods], dim=1) * scale
        else:
            w = self.model.dot_weights().detach().float()
            root, sign = w.abs().sqrt(), torch.sign(w)
            u = torch.cat([self.user_reps[m] * (sign[k] * root[k]) for k, m in enumerate(mods)], 1)
            i = torch.cat([self.item_reps[m] * root[k] for k, m in enumerate(mods)], 1)
        return (
            np.ascontiguousarray(u.numpy(), dtype=np.float32),
            np.ascontiguousarray(i.numpy(), dtype=np.float32),
        )

    def use_two_stage(self, mode: str) -> bool:
        """``auto``: two-stage above ``eval.two_stage_above_items`` items, else exact."""
        if mode not in MODES:
            raise MagnetError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if mode == "auto":
            return self.num_items > self.cfg.eval.two_stage_above_items
        return mode == "two-stage"


def load_run(
    run: str | Path,
    data: str | Path | None = None,
    quiet: bool = False,
    any_dataset: bool = False,
    checkpoint: str | Path = BEST_CHECKPOINT,
) -> LoadedRun:
    """Load a run folder's best model and compute full-graph representations once.

    ``data`` replaces the run's ``data.path`` (e.g. the dataset was moved); it must be the
    dataset the run was trained on (checksum of the run's dataset.json) unless ``any_dataset``.
    ``checkpoint``: another file of best.pt's format, relative to the run folder (e.g.
    ``checkpoints/epoch-3.pt`` of ``eval.snapshot_every_epoch``).
    """
    from magnet_dist.train.checkpoint import load_checkpoint
    from magnet_dist.train.reference import FullGraph, build_model

    run_dir = Path(run).expanduser()
    if not run_dir.is_dir():
        raise MagnetError(
            f"run folder {run_dir} does not exist (expected a `magnet-dist train` run)"
        )
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise MagnetError(
            f"{cfg_path} is missing: {run_dir} is not a `magnet-dist train` run folder"
        )
    cfg = load_config(cfg_path)
    ckpt_path = run_dir / checkpoint
    if not ckpt_path.is_file():
        raise MagnetError(
            f"{ckpt_path} is missing: the run has no evaluated model yet "
            "(train at least until the first validation)"
        )
    ck = load_checkpoint(ckpt_path, cfg)  # fingerprint checked against the run's own config
    for key in ("model", "embeddings"):
        if key not in ck:
            raise MagnetError(f"{ckpt_path} has no {key!r} entry; it is not a best checkpoint")

    data_path = Path(data).expanduser() if data is not None else Path(cfg.data.path)
    if not (data_path / "manifest.json").is_file():
        hint = "" if data is not None else f" (data.path of {cfg_path})"
        raise MagnetError(
            f"dataset {data_path}{hint} not found or not prepared; pass --data DIR pointing at "
            "the dataset folder the run was trained on"
        )
    cfg.data.path = str(data_path)
    ds = load_dataset(data_path)
    _check_same_dataset(run_dir, ds, any_dataset)

    weight = ck["embeddings"].get("weight") if isinstance(ck["embeddings"], dict) else None
    expected = (ds.num_users + ds.num_items, cfg.model.dim)
    if weight is None or tuple(weight.shape) != expected:
        got = None if weight is None else tuple(weight.shape)
        raise MagnetError(
            f"{ckpt_path}: ID embeddings of shape {got}, but dataset {data_path} needs {expected} "
            f"({ds.num_users} users + {ds.num_items} items, model.dim={cfg.model.dim}); "
            "was the run trained on another dataset?"
        )

    edges = None
    if cfg.model.content_view:
        from magnet_dist.graph.content import content_edges_up_to_date, read_content_edges

        if not content_edges_up_to_date(data_path, cfg.graph) and not quiet:
            print(
                f"[load] warning: content edges of {data_path} were built with other graph "
                "settings or another dataset version than this run's config",
                file=sys.stderr,
            )
        edges = read_content_edges(data_path, ds.num_items)

    model = build_model(cfg, ds)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise MagnetError(
            f"{ckpt_path}: model weights do not fit the model built from {cfg_path} and dataset "
            f"modalities {list(ds.modalities)} ({' '.join(first[:3])})"
        ) from None
    model.eval()
    graph = FullGraph(ds, cfg, edges)
    with torch.no_grad():
        reps = graph.encode(model, weight.float())
    user_reps = {m: v[: ds.num_users].contiguous() for m, v in reps.items()}
    item_reps = {m: v[ds.num_users :].contiguous() for m, v in reps.items()}
    epoch = ck.get("epoch")
    return LoadedRun(
        run_dir, cfg, ds, model, user_reps, item_reps, int(epoch) if epoch is not None else None
    )


def _check_same_dataset(run_dir: Path, ds: Dataset, any_dataset: bool) -> None:
    """Refuse a dataset other than the one trained on (e.g. re-prepared with another split:
    same sizes, so nothing else would notice, and the test items may be training items)."""
    from magnet_dist.train.run_folder import DATASET_FILE, recorded_dataset_checksum

    trained_on = recorded_dataset_checksum(run_dir)
    if trained_on is None or any_dataset or trained_on == ds.checksum:
        return
    raise MagnetError(
        f"dataset {ds.path} (checksum {ds.checksum[:16]}) is another dataset than the one run "
        f"{run_dir} was trained on (checksum {trained_on[:16]} in {run_dir / DATASET_FILE}; "
        "re-prepared or replaced?); point --data at the original dataset, or pass "
        "--any-dataset to use this one anyway"
    )


def candidate_score_fn(
    model: MagnetModel, user_reps: Reps, item_reps: Reps, max_tokens=SCORE_CHUNK_TOKENS
):
    """``fn(user_ids [n], item_ids [n, c]) -> [n, c]``: the full MAGNET score (dot + MoE) of
    each user with each of its candidate items, for ``rank_candidates`` / re-ranking."""

    @torch.no_grad()
    def fn(user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        n, c = item_ids.shape
        out = torch.empty(n, c)
        rows = max(1, max_tokens // max(c, 1))
        for lo in range(0, n, rows):
            uid = user_ids[lo : lo + rows]
            iid = item_ids[lo : lo + rows]
            hu = {m: v[uid].repeat_interleave(c, 0) for m, v in user_reps.items()}
            hi = {m: v[iid.reshape(-1)] for m, v in item_reps.items()}
            with eval_mode(model):  # no token dropped at capacity: chunking cannot change scores
                y, _ = model.score(hu, hi)
            out[lo : lo + len(uid)] = y.view(len(uid), c)
        return out

    return fn


def retrieve_for(
    loaded: LoadedRun,
    users: np.ndarray,
    n: int,
    exclude: CSR | None,
    progress: bool,
    user_vecs: np.ndarray | None = None,
    item_vecs: np.ndarray | None = None,
) -> np.ndarray:
    """Stage one of two: N candidates per user by dot score through HNSW (graph.hnsw_* knobs)."""
    from magnet_dist.eval.ranking import retrieve_candidates

    if user_vecs is None or item_vecs is None:
        user_vecs, item_vecs = loaded.retrieval_vectors()
    g = loaded.cfg.graph
    return retrieve_candidates(
        user_vecs[users],
        item_vecs,
        n,
        users=users,
        exclude=exclude,
        m=g.hnsw_m,
        ef_construction=g.hnsw_ef_construction,
        ef=max(g.hnsw_ef, 2 * min(n, len(item_vecs))),
        seed=loaded.cfg.train.seed,
        progress=progress,
    )


def add_ranking_arguments(parser, candidates_help: str) -> None:
    """--data / --mode / --candidates, shared by ``evaluate`` and ``recommend``."""
    parser.add_argument(
        "--data", default=None, help="dataset folder (None: data.path of the run's config)"
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="auto",
        help="exact full ranking, or two-stage retrieve-then-rerank; auto: two-stage above "
        "eval.two_stage_above_items items",
    )
    parser.add_argument("--candidates", type=int, default=None, help=candidates_help)
    parser.add_argument(
        "--any-dataset",
        action="store_true",
        help="accept a dataset whose checksum differs from the one the run was trained on",
    )
