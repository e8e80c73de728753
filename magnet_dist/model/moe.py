"""(IV) The sparse triplet MoE head, dense single-process form (the reference).

``magnet_dist/parallel/`` provides the expert-parallel form with the same call signature:
``moe(tokens, explore) -> (mixture [N, d], RoutingStats)``.
"""

from __future__ import annotations

import torch
from torch import nn

from magnet_dist.model.experts import TemplateExpert
from magnet_dist.model.router import TopKRouter, capacity_for, routing_stats


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
        out = tokens.new_zeros(tokens.shape[0], self.dim)
        for e, expert in enumerate(self.experts):
            token_idx, slot = ((routing.experts == e) & routing.kept).nonzero(as_tuple=True)
            if token_idx.numel() == 0:
                continue
            y = expert(tokens[token_idx]) * routing.combine[token_idx, slot].unsqueeze(1)
            out = out.index_add(0, token_idx, y)
        return out, routing_stats(routing)
