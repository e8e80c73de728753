"""(IV) The sparse triplet MoE head, dense single-process form (the reference).

``magnet_dist/parallel/`` provides the expert-parallel form with the same call signature:
``moe(tokens, explore) -> (mixture [N, d], RoutingStats)``.
"""

from __future__ import annotations

import torch
from torch import nn

from magnet_dist.model.experts import TemplateExpert, grouped_expert_outputs
from magnet_dist.model.router import Routing, TopKRouter, capacity_for, routing_stats


class TripletMoE(nn.Module):
    def __init__(
        self,
        experts: list[TemplateExpert],
        token_dim: int,
        top_k: int,
        capacity_factor: float | None = None,
        router_noise: float = 0.0,
        router_blocks: int = 0,
    ) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.router = TopKRouter(token_dim, len(experts), top_k, router_noise, router_blocks)
        self.capacity_factor = capacity_factor
        self.dim = experts[0].dim

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, tokens: torch.Tensor, explore: bool = False):
        # capacity is a training-time budget: in eval mode no token is dropped, so a pair's
        # score does not depend on which other pairs share its scoring chunk
        factor = self.capacity_factor if self.training else None
        capacity = capacity_for(tokens.shape[0], self.num_experts, self.router.top_k, factor)
        routing = self.router(tokens, capacity, explore)
        return expert_mixture(self.experts, tokens, routing, self.dim), routing_stats(routing)


def expert_mixture(
    experts: nn.ModuleList, tokens: torch.Tensor, routing: Routing, dim: int
) -> torch.Tensor:
    """``sum_k combine_k * f_{e_k}(x)`` per token, over the kept assignments.

    One gather and one scatter for all experts: the kept (token, choice) assignments are
    sorted by expert (stable), their tokens gathered once into a buffer in which every
    expert's rows are one contiguous slice, each expert runs on its slice (a view), and the
    weighted outputs go back with one ``index_add``. Unlike a padded ``[E, C, d]`` bmm it
    computes exactly the assigned rows, whatever the load skew; unlike a masked loop it does
    not gather, scatter and back-propagate a full ``[N, d]`` buffer per expert.
    """
    n, k = routing.experts.shape
    flat = routing.experts.reshape(-1)
    kept = routing.kept.reshape(-1)
    if bool(kept.all()):
        assign = torch.argsort(flat, stable=True)
    else:
        live = kept.nonzero().squeeze(1)
        assign = live[torch.argsort(flat[live], stable=True)]
    counts = torch.bincount(flat[assign], minlength=len(experts)).tolist()
    tok = torch.div(assign, k, rounding_mode="floor")
    y = grouped_expert_outputs(list(experts), tokens.index_select(0, tok), counts)
    y = y * routing.combine.reshape(-1)[assign].unsqueeze(1)
    return tokens.new_zeros(n, dim).index_add(0, tok, y)
