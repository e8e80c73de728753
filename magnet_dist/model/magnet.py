"""The MAGNET module: dual-view encoder + triplet MoE head + BPR objective (pure torch).

One interface for every variant (MMRec style): ``encode`` (hops -> per-modality representations),
``score`` (pairs -> scores + routing stats) and ``loss``. Ablations and the LightGCN baseline are
configuration of this one class, never copies. ID embeddings live outside (``nn.Embedding`` in the
reference trainer, DGL ``DistEmbedding`` in the distributed one) and come in as a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from magnet_dist.config import Config, check_expert_count
from magnet_dist.model.encoder import DualViewEncoder
from magnet_dist.model.experts import build_experts
from magnet_dist.model.hops import Hop
from magnet_dist.model.moe import TripletMoE
from magnet_dist.model.router import RoutingStats, rms_normalise_blocks
from magnet_dist.model.schedule import COVERAGE, ScheduleState, routing_loss


@dataclass
class LossOutput:
    loss: torch.Tensor
    bpr: torch.Tensor
    reg: torch.Tensor
    route: torch.Tensor
    stats: RoutingStats | None  # global (reduced) routing statistics of this step


class MagnetModel(nn.Module):
    def __init__(self, cfg: Config, content_dims: dict[str, int], moe: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        # model.content_channels=false: the features stay in the data, the model ignores them
        self.content_dims = dict(content_dims) if m.content_channels else {}
        self.encoder = DualViewEncoder(
            self.content_dims, m.dim, m.layers, m.content_view, m.fusion, m.fusion_init
        )
        self.modalities = self.encoder.modalities
        self.token_dim = len(self.modalities) * m.dim
        if m.score_weights == "learned":
            # w_m of the base score; at (1, 0, ...) it is the ID LightGCN's dot product
            init = torch.zeros(len(self.modalities))
            init[0] = 1.0
            self.dot_weight = nn.Parameter(init)
        self.moe: nn.Module | None = None
        if m.use_moe:
            self.moe = moe if moe is not None else build_dense_moe(cfg, self.modalities)
            self.readout = nn.Linear(m.dim, 1, bias=False)
            nn.init.zeros_(self.readout.weight)  # start from the dot-product score

    def encode(
        self,
        hops: list[Hop],
        id_emb: torch.Tensor,
        feats: dict[str, torch.Tensor],
        is_item_in: torch.Tensor,
        is_item_out: torch.Tensor,
        deep: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        return self.encoder(hops, id_emb, feats, is_item_in, is_item_out, deep)

    def token(self, hu: dict[str, torch.Tensor], hi: dict[str, torch.Tensor]) -> torch.Tensor:
        """Interaction-conditioned query ``x = [z_b; z_c1; ...]`` with ``z_m = h_u^m * h_i^m``
        (each z_m RMS-normalised per token when ``moe.token_norm="all"``)."""
        return self.token_of(interactions(hu, hi))

    def token_of(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`token` from the products ``z_m`` (:func:`interactions`)."""
        x = torch.cat([z[m] for m in self.modalities], dim=1)
        if self.cfg.moe.detach_token:
            x = x.detach()
        if self.cfg.moe.token_norm == "all":
            x = rms_normalise_blocks(x, len(self.modalities))
        return x

    def dot_weights(self) -> torch.Tensor:
        """``w_m`` of the base score ``sum_m w_m <h_u^m, h_i^m>`` (``model.score_weights``):
        1/M each ("mean"), (1, 0, ...) ("behaviour") or learned ("learned")."""
        mode = self.cfg.model.score_weights
        if mode == "learned":
            return self.dot_weight
        n = len(self.modalities)
        if mode == "behaviour":
            return torch.zeros(n).index_fill_(0, torch.tensor([0]), 1.0)
        return torch.full((n,), 1.0 / n)

    def dot_score(self, hu: dict[str, torch.Tensor], hi: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.dot_score_of(interactions(hu, hi))

    @property
    def behaviour_only(self) -> bool:
        """The base score is the ID channel's dot product alone (every other ``w_m`` is 0), so
        the other channels' products need not be computed."""
        return self.cfg.model.score_weights == "behaviour" or len(self.modalities) == 1

    def dot_score_of(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`dot_score` from the products ``z_m`` (:func:`interactions`)."""
        if self.behaviour_only:
            return z[self.modalities[0]].sum(1)
        dots = torch.stack([z[m].sum(1) for m in self.modalities])
        if self.cfg.model.score_weights == "mean":
            return dots.mean(0)
        return self.dot_weights().to(dots) @ dots

    def dot_matrix(self, hu: dict[str, torch.Tensor], hi: dict[str, torch.Tensor]) -> torch.Tensor:
        """The base score of every (user row, item row) pair, ``[n_u, n_i]``."""
        if self.behaviour_only:
            b = self.modalities[0]
            return hu[b] @ hi[b].t()
        if self.cfg.model.score_weights == "mean":
            return torch.stack([hu[m] @ hi[m].t() for m in self.modalities]).mean(0)
        w = self.dot_weights()
        return sum(w[k] * (hu[m] @ hi[m].t()) for k, m in enumerate(self.modalities))

    def score(
        self,
        hu: dict[str, torch.Tensor],
        hi: dict[str, torch.Tensor],
        explore: bool = False,
    ) -> tuple[torch.Tensor, RoutingStats | None]:
        """``y = sum_m w_m <h_u^m, h_i^m> + w^T sum_k g_k f_k(x_k)`` for aligned rows of hu, hi
        (``w_m = 1/M`` by default, see :meth:`dot_weights`)."""
        z = interactions(hu, hi)  # shared by the base score and the token
        y = self.dot_score_of(z)
        if self.moe is None:
            return y, None
        mixture, stats = self.moe(self.token_of(z), explore)
        return y + self.readout(mixture).squeeze(1), stats

    def loss(
        self,
        hu: dict[str, torch.Tensor],
        hpos: dict[str, torch.Tensor],
        hneg: dict[str, torch.Tensor],
        ego: torch.Tensor,
        state: ScheduleState,
        reduce_stats=None,
    ) -> LossOutput:
        """BPR over (u, i+, i-) rows (hneg has ``n_neg`` rows per user, row-major) + L2 on the
        batch's layer-0 ID embeddings ``ego`` + routing terms on the global routing stats."""
        n = next(iter(hu.values())).shape[0]
        n_neg = next(iter(hneg.values())).shape[0] // n
        hu_rep = {m: v.repeat_interleave(n_neg, 0) for m, v in hu.items()} if n_neg > 1 else hu
        both_u = {m: torch.cat([hu[m], hu_rep[m]]) for m in self.modalities}
        both_i = {m: torch.cat([hpos[m], hneg[m]]) for m in self.modalities}
        order = None
        if self.moe is not None and self.cfg.moe.capacity_factor is not None:
            # tokens grouped per user (its positive, then its negatives): with a capacity factor
            # the tokens at the end of an expert's queue are dropped, and in [all positives; all
            # negatives] order those would be the negatives, so the head would learn from drops
            # that track the label; grouped, a drop falls on a whole (u, i+, i-) group alike.
            # Without one no token is dropped and the order changes nothing (2 gathers saved).
            order = pair_grouped_order(n, n_neg, hpos[self.modalities[0]].device)
            both_u = {m: v[order] for m, v in both_u.items()}
            both_i = {m: v[order] for m, v in both_i.items()}
        scores, stats = self.score(both_u, both_i, explore=state.stage == COVERAGE)
        if order is not None:  # back to [positives; negatives]
            scores = torch.empty_like(scores).index_copy(0, order, scores)
        pos = scores[:n].repeat_interleave(n_neg)
        neg = scores[n:]
        bpr = F.softplus(neg - pos).mean()
        reg = self.cfg.model.reg_weight * ego.pow(2).sum() / n
        route = scores.new_zeros(())
        if stats is not None:
            if reduce_stats is not None:
                stats = stats.reduce(reduce_stats)
            route = routing_loss(stats, state, self.cfg.routing)
        return LossOutput(bpr + reg + route, bpr, reg, route, stats)


def interactions(
    hu: dict[str, torch.Tensor], hi: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``z_m = h_u^m * h_i^m`` per modality, for aligned rows of ``hu`` and ``hi``."""
    return {m: hu[m] * hi[m] for m in hu}


def pair_grouped_order(n: int, n_neg: int, device=None) -> torch.Tensor:
    """Row order of ``[n positives; n * n_neg negatives]`` that puts each user's negatives
    right after its positive: ``[p0, n0_0.., p1, n1_0.., ...]``."""
    pos = torch.arange(n, device=device).unsqueeze(1)
    neg = n + torch.arange(n * n_neg, device=device).view(n, n_neg)
    return torch.cat([pos, neg], dim=1).reshape(-1)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: the MoE head (router, experts, read-out) gets ``moe.weight_decay`` and,
    for a MagnetModel, the learning rate ``train.lr * moe.lr_scale`` (when the scale is not 1)."""
    moe, rest = [], []
    for name, p in model.named_parameters():
        (moe if name.startswith(("moe.", "readout.")) else rest).append(p)
    groups = [{"params": rest}]
    if moe:
        groups.append({"params": moe, "weight_decay": weight_decay})
        cfg = getattr(model, "cfg", None)
        if cfg is not None and cfg.moe.lr_scale != 1.0:
            groups[-1]["lr"] = cfg.train.lr * cfg.moe.lr_scale
    return groups


def build_expert_pool(cfg: Config, modalities: list[str]) -> list:
    """The E experts of the configured pool, in global order (any sharding picks from these)."""
    m, moe = cfg.model, cfg.moe
    return build_experts(
        modalities,
        list(moe.families),
        moe.experts_per_template,
        m.dim,
        moe.hidden_mult * m.dim,
        moe.alpha,
        moe.beta,
        moe.delta,
        use_templates=m.templates,
        dropout=moe.dropout,
    )


def router_blocks(cfg: Config, modalities: list[str]) -> int:
    """Modality blocks the router normalises (``moe.token_norm`` router/all), else 0."""
    return len(modalities) if cfg.moe.token_norm != "none" else 0


def build_dense_moe(cfg: Config, modalities: list[str]) -> TripletMoE:
    check_expert_count(cfg, len(modalities))  # E depends on the dataset's modalities
    moe = cfg.moe
    return TripletMoE(
        build_expert_pool(cfg, modalities),
        len(modalities) * cfg.model.dim,
        moe.top_k,
        moe.capacity_factor,
        moe.router_noise,
        router_blocks(cfg, modalities),
    )
