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

import warnings
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
    _orders: dict = field(default_factory=dict, repr=False, compare=False)

    def matrix(self, view: str, src_mask: torch.Tensor | None = None) -> SparseMatrix:
        """The hop as a ``[num_dst, num_src]`` sparse matrix of one view's norms (cached).

        ``src_mask``: keep only the columns of these src nodes (renumbered in mask order), for
        inputs that exist on a subset of nodes only (layer-0 content: item rows)."""
        key = (view, src_mask is not None)
        cached = self._matrices.get(key)
        if cached is not None and (src_mask is None or cached[0] is src_mask):
            return cached[1]
        norm = self.norm_observed if view == "observed" else self.norm_augmented
        keep = norm != 0
        src, num_src = self.src, self.num_src
        self_src = self.src
        if src_mask is not None:
            keep &= src_mask[src]
            src = (torch.cumsum(src_mask, 0) - 1)[src]  # renumbering keeps the src order
            num_src = int(src_mask.sum())
        dst, num_dst = self.dst, self.num_dst
        # edges sorted by dst (or src) once per hop; every view and mask filters that order.
        # The builders must not capture ``self``: a hop -> matrix -> builder -> hop cycle would
        # keep every step's hops (hundreds of MB at scale) alive until the cyclic GC runs.
        orders = self._orders
        m = SparseMatrix(
            lambda: _csr(_order(orders, "dst", dst), keep, dst, src, norm, num_dst, num_src),
            lambda: _csr(_order(orders, "src", self_src), keep, src, dst, norm, num_src, num_dst),
        )
        self._matrices[key] = (src_mask, m)
        return m

    def release_matrices(self) -> None:
        """Drop the cached sparse matrices (a full-graph hop's are GBs at scale)."""
        self._matrices.clear()

    def propagate(
        self, h: torch.Tensor, view: str, src_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One LightGCN step: ``out[d] = sum_{(s,d)} norm * h[s]`` (no weights, no non-linearity).

        ``h`` has one row per src node, or with ``src_mask`` one row per masked src node."""
        return _SpMM.apply(self.matrix(view, src_mask), h)

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


class SparseMatrix:
    """A fixed sparse matrix in CSR, and its transpose (for the backward), each built on first use.

    torch's COO ``sparse.mm`` coalesces (sorts) the matrix, and its transpose again in every
    backward; here each hop sorts its edges once by dst and once by src, and both views and the
    item-column restriction filter those orders, which at scale was a large share of a step."""

    def __init__(self, build, build_transpose) -> None:
        self._build = {"csr": build, "transpose": build_transpose}
        self._built: dict[str, torch.Tensor] = {}

    def _get(self, which: str) -> torch.Tensor:
        if which not in self._built:
            self._built[which] = self._build[which]()
        return self._built[which]

    @property
    def csr(self) -> torch.Tensor:
        return self._get("csr")

    @property
    def transpose(self) -> torch.Tensor:
        return self._get("transpose")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.csr.shape)


def _order(orders: dict, by: str, index: torch.Tensor) -> torch.Tensor:
    if by not in orders:
        orders[by] = torch.sort(index, stable=True)[1]
    return orders[by]


def _csr(order, keep, rows, cols, values, n_rows: int, n_cols: int) -> torch.Tensor:
    """CSR of the kept edges, ``order`` sorting them by row (duplicates are summed by the
    product; columns need no order within a row)."""
    order = order[keep[order]]
    rows = rows[order]
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols[order], values[order], (n_rows, n_cols))


class _SpMM(torch.autograd.Function):
    """``A @ h`` for a constant sparse ``A``; the backward is ``A^T @ grad`` (no gradient for A)."""

    @staticmethod
    def forward(ctx, a: SparseMatrix, h: torch.Tensor) -> torch.Tensor:
        ctx.a = a
        if h.shape[0] != a.shape[1]:
            raise ValueError(f"propagate: {h.shape[0]} input rows for a hop with {a.shape[1]}")
        return a.csr @ h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, ctx.a.transpose @ grad.contiguous()


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
