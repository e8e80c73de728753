"""The graph the encoder sees: a list of message-passing hops, pure torch.

One structure serves the full graph (every hop = all nodes -> all nodes) and DGL's sampled
message-flow graphs (one hop per block, converted in ``magnet_dist/graph/``), so the model never
imports DGL. Nodes are homogeneous: users are ``0..U-1``, items ``U..U+I-1`` (global ids).

Edges carry two normalised weights, one per view, computed with *full-graph* degrees:
``norm_observed`` is ``1/sqrt(deg_o(src) deg_o(dst))`` on user-item edges and 0 on item-item
edges; ``norm_augmented`` is ``w/sqrt(deg_a(src) deg_a(dst))`` on every edge (user-item weight 1,
item-item weight = fused cosine), with weighted degrees of the augmented view. One sampling pass
thus serves both views.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Hop:
    """Messages flow ``src -> dst``; ``dst_in_src[j]`` is the position of dst node j among src."""

    src: torch.Tensor  # int64 [n_edges], index into the hop's src node list
    dst: torch.Tensor  # int64 [n_edges], index into the hop's dst node list
    norm_observed: torch.Tensor  # float32 [n_edges]
    norm_augmented: torch.Tensor  # float32 [n_edges]
    num_src: int
    num_dst: int
    dst_in_src: torch.Tensor  # int64 [num_dst]
    _matrices: dict = field(default_factory=dict, repr=False, compare=False)

    def matrix(self, view: str) -> torch.Tensor:
        """The hop as a sparse ``[num_dst, num_src]`` matrix of one view's norms (cached)."""
        if view not in self._matrices:
            norm = self.norm_observed if view == "observed" else self.norm_augmented
            keep = norm != 0
            idx = torch.stack([self.dst[keep], self.src[keep]])
            self._matrices[view] = torch.sparse_coo_tensor(
                idx, norm[keep], (self.num_dst, self.num_src)
            ).coalesce()
        return self._matrices[view]

    def propagate(self, h: torch.Tensor, view: str) -> torch.Tensor:
        """One LightGCN step: ``out[d] = sum_{(s,d)} norm * h[s]`` (no weights, no non-linearity)."""
        return torch.sparse.mm(self.matrix(view), h)

    def to(self, device: torch.device | str) -> Hop:
        return Hop(
            self.src.to(device),
            self.dst.to(device),
            self.norm_observed.to(device),
            self.norm_augmented.to(device),
            self.num_src,
            self.num_dst,
            self.dst_in_src.to(device),
        )


def full_graph_hop(
    num_users: int,
    num_items: int,
    train_users: torch.Tensor,
    train_items: torch.Tensor,
    content_src: torch.Tensor | None = None,
    content_dst: torch.Tensor | None = None,
    content_weight: torch.Tensor | None = None,
) -> Hop:
    """The whole graph as one hop (all nodes -> all nodes), for the full-graph reference trainer.

    ``train_users``/``train_items`` are 0-based per type; content edges are 0-based item ids and
    must already be symmetric (both directions listed).
    """
    n = num_users + num_items
    u = train_users.long()
    i = train_items.long() + num_users
    ui_src = torch.cat([u, i])
    ui_dst = torch.cat([i, u])
    ones = torch.ones(ui_src.numel(), dtype=torch.float32)
    if content_src is None or content_src.numel() == 0:
        ii_src = ii_dst = torch.zeros(0, dtype=torch.long)
        ii_w = torch.zeros(0, dtype=torch.float32)
    else:
        ii_src = content_src.long() + num_users
        ii_dst = content_dst.long() + num_users
        ii_w = content_weight.float()
    src = torch.cat([ui_src, ii_src])
    dst = torch.cat([ui_dst, ii_dst])
    w_obs = torch.cat([ones, torch.zeros_like(ii_w)])
    w_aug = torch.cat([ones, ii_w])
    deg_o = torch.zeros(n).index_add_(0, dst, w_obs)
    deg_a = torch.zeros(n).index_add_(0, dst, w_aug)
    return Hop(
        src=src,
        dst=dst,
        norm_observed=edge_norm(w_obs, deg_o[src], deg_o[dst]),
        norm_augmented=edge_norm(w_aug, deg_a[src], deg_a[dst]),
        num_src=n,
        num_dst=n,
        dst_in_src=torch.arange(n),
    )


def edge_norm(weight: torch.Tensor, deg_src: torch.Tensor, deg_dst: torch.Tensor) -> torch.Tensor:
    """Symmetric normalisation ``w / sqrt(deg_src * deg_dst)``; 0 where a degree is 0."""
    denom = (deg_src * deg_dst).clamp_min(1e-12).sqrt()
    return torch.where(weight > 0, weight / denom, torch.zeros_like(weight)).float()
