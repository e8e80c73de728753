"""Neighbour sampling over the user-item-content heterograph into the model's ``Hop``s.

One pass samples all three edge types (ui, iu, ii), so the same hops serve both views: the
observed view uses ``norm_observed`` (0 on ii edges), the augmented view ``norm_augmented``.
Norms use the FULL-GRAPH degrees stored as node data (``deg_o``, ``deg_a``) and the ii edge
weights, never the block's own degrees, so with fanout -1 a sampled computation equals the
full-graph one for the output nodes.

Node numbering inside a hop (homogeneous): the hop's users first, then its items, each in DGL's
block order. DGL's ``to_block`` puts a block's dst nodes first among its src nodes (per type),
and a hop's dst nodes are the next hop's src nodes, so every hop's node list is, per type, a
prefix of the input node list: input row of user j is j, of item j is ``num_input_users + j``.

The same code samples a local ``DGLGraph`` (:class:`LocalGraph`, tests and single-process runs)
and a ``DistGraph`` (:class:`magnet_dist.graph.dist.GraphClient`); only the three data-access
functions differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import dgl
import torch

from magnet_dist.graph.partition import FEATURE_PREFIX, II, IU, UI
from magnet_dist.model.hops import Hop, edge_norm


@dataclass
class SampledBlocks:
    """One mini-batch's message-flow graph, in the sampled graph's id space.

    ``input_users``/``input_items``: graph ids of the first hop's src nodes (input rows are
    users first, then items); ``features``: per modality ``[num_input_items, d]`` (item rows only, in
    ``is_item_in`` order; users have no content input);
    ``user_rows``/``item_rows``: for each requested seed (in request order, duplicates
    allowed) its row among the output nodes (the last hop's dst nodes: unique seed users, then
    unique seed items); ``output_in_input``: input row of every output node (layer-0 rows,
    e.g. for the L2 term on the batch's ID embeddings).
    """

    hops: list[Hop]
    input_users: torch.Tensor
    input_items: torch.Tensor
    is_item_in: torch.Tensor
    is_item_out: torch.Tensor
    features: dict[str, torch.Tensor]
    user_rows: torch.Tensor
    item_rows: torch.Tensor
    output_in_input: torch.Tensor

    @property
    def num_input(self) -> int:
        return int(self.is_item_in.numel())

    @property
    def num_output(self) -> int:
        return int(self.is_item_out.numel())

    @property
    def output_users(self) -> torch.Tensor:
        """Graph ids of the output users (the input list's prefix, see the module docstring)."""
        return self.input_users[: self.num_output - int(self.is_item_out.sum())]

    @property
    def output_items(self) -> torch.Tensor:
        return self.input_items[: int(self.is_item_out.sum())]

    def to(self, device: torch.device | str) -> SampledBlocks:
        return SampledBlocks(
            [h.to(device) for h in self.hops],
            self.input_users,
            self.input_items,
            self.is_item_in.to(device),
            self.is_item_out.to(device),
            {k: v.to(device) for k, v in self.features.items()},
            self.user_rows.to(device),
            self.item_rows.to(device),
            self.output_in_input.to(device),
        )


class GraphAccess:
    """What the sampler needs from a graph: neighbour sampling and node/edge data lookups."""

    def sample_frontier(self, seeds: dict[str, torch.Tensor], fanout: int) -> dgl.DGLGraph:
        """In-edges of ``seeds`` (at most ``fanout`` per edge type and node, -1 = all), as a
        heterograph over all nodes with per-type edge ids in ``edata[dgl.EID]``."""
        raise NotImplementedError

    def node_data(self, ntype: str, name: str, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def edge_data(self, etype: tuple[str, str, str], name: str, eids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LocalGraph(GraphAccess):
    """A whole heterograph in this process (from :func:`partition.build_heterograph`)."""

    def __init__(self, graph: dgl.DGLGraph) -> None:
        self.graph = graph

    def sample_frontier(self, seeds, fanout):
        fanouts = {et: fanout for et in self.graph.canonical_etypes}
        return dgl.sampling.sample_neighbors(
            self.graph, seeds, fanouts, copy_ndata=False, copy_edata=True
        )

    def node_data(self, ntype, name, ids):
        return self.graph.nodes[ntype].data[name][ids]

    def edge_data(self, etype, name, eids):
        return self.graph.edges[etype].data[name][eids]


def modalities_of(names) -> list[str]:
    """Content modality names from item data names (``feat_<modality>``), sorted."""
    return sorted(n[len(FEATURE_PREFIX) :] for n in names if n.startswith(FEATURE_PREFIX))


def sample_blocks(
    graph: GraphAccess,
    seed_users: torch.Tensor,
    seed_items: torch.Tensor,
    fanouts: list[int],
    modalities: list[str],
    rescale: bool = True,
) -> SampledBlocks:
    """Sample ``len(fanouts)`` hops around the seeds (graph ids); ``fanouts[0]`` is the hop
    nearest the input (DGL's convention), each fanout applies per edge type, -1 = all.

    ``rescale``: multiply each sampled edge's norm by (in-edges of its type at dst) / (sampled
    ones), an unbiased estimate of the full-graph propagation; without it a node with degree
    far above the fanout would see only a fanout/degree share of its neighbourhood. With every
    neighbour sampled the factor is exactly 1."""
    seed_users = torch.as_tensor(seed_users, dtype=torch.int64).reshape(-1)
    seed_items = torch.as_tensor(seed_items, dtype=torch.int64).reshape(-1)
    out_users, user_rows = torch.unique(seed_users, return_inverse=True)
    out_items, item_rows = torch.unique(seed_items, return_inverse=True)

    # Sample from the output towards the input; dst nodes of block k = src nodes of block k+1.
    blocks = []
    dst = {"user": out_users, "item": out_items}
    for fanout in reversed(fanouts):
        frontier = graph.sample_frontier(dst, int(fanout))
        block = dgl.to_block(frontier, dst_nodes=dst)
        # to_block's EID is the frontier's edge id; map it to the graph's ii edge id
        if II in block.canonical_etypes and block.num_edges(II):
            block.edges[II].data[dgl.EID] = frontier.edges[II].data[dgl.EID][
                block.edges[II].data[dgl.EID].long()
            ]
        blocks.insert(0, block)
        dst = {nt: block.srcnodes[nt].data[dgl.NID] for nt in ("user", "item")}
    input_users, input_items = dst["user"], dst["item"]
    n_in_u, n_in_i = int(input_users.numel()), int(input_items.numel())

    degrees = {
        nt: {d: graph.node_data(nt, d, ids).float() for d in ("deg_o", "deg_a")}
        for nt, ids in (("user", input_users), ("item", input_items))
    }
    if rescale and blocks and II in blocks[0].canonical_etypes:
        degrees["item"]["cnt_ii"] = graph.node_data("item", "cnt_ii", input_items).float()
    hops = [_block_to_hop(block, graph, degrees, rescale) for block in blocks]

    n_out_u = int(out_users.numel())
    n_out_i = int(out_items.numel())
    # item rows only (``is_item_in``'s True rows, in order): users have no content input, and
    # at scale most input nodes are users, so zero rows for them would dominate every step
    features = {
        m: graph.node_data("item", FEATURE_PREFIX + m, input_items).float() for m in modalities
    }
    return SampledBlocks(
        hops=hops,
        input_users=input_users,
        input_items=input_items,
        is_item_in=torch.cat(
            [torch.zeros(n_in_u, dtype=torch.bool), torch.ones(n_in_i, dtype=torch.bool)]
        ),
        is_item_out=torch.cat(
            [torch.zeros(n_out_u, dtype=torch.bool), torch.ones(n_out_i, dtype=torch.bool)]
        ),
        features=features,
        user_rows=user_rows,
        item_rows=item_rows + n_out_u,
        output_in_input=torch.cat([torch.arange(n_out_u), n_in_u + torch.arange(n_out_i)]),
    )


def _block_to_hop(block, graph: GraphAccess, degrees, rescale: bool = False) -> Hop:
    su, si = block.num_src_nodes("user"), block.num_src_nodes("item")
    du, di = block.num_dst_nodes("user"), block.num_dst_nodes("item")
    src_off = {"user": 0, "item": su}
    dst_off = {"user": 0, "item": du}
    srcs, dsts, w_obs, w_aug, deg_pairs, scales = [], [], [], [], [], []
    for etype in (UI, IU, II):
        if etype not in block.canonical_etypes:  # a graph without content edges
            continue
        s, d = block.edges(etype=etype)
        stype, _, dtype = etype
        if etype == II:
            if s.numel():
                w = graph.edge_data(II, "weight", block.edges[II].data[dgl.EID].long()).float()
            else:
                w = torch.zeros(0, dtype=torch.float32)
            wo = torch.zeros_like(w)
        else:
            w = torch.ones(s.numel(), dtype=torch.float32)
            wo = w
        srcs.append(s + src_off[stype])
        dsts.append(d + dst_off[dtype])
        w_obs.append(wo)
        w_aug.append(w)
        # src / dst positions are prefixes of the input node list (see module docstring)
        deg_pairs.append((stype, s, dtype, d))
        if rescale:
            full = degrees[dtype]["cnt_ii" if etype == II else "deg_o"][
                : block.num_dst_nodes(dtype)
            ]
            sampled = torch.bincount(d.long(), minlength=block.num_dst_nodes(dtype)).float()
            scales.append((full / sampled.clamp_min(1))[d.long()])
    src = torch.cat(srcs).long()
    dst = torch.cat(dsts).long()
    w_obs = torch.cat(w_obs)
    w_aug = torch.cat(w_aug)

    def degree(kind: str, which: int) -> torch.Tensor:
        parts = []
        for stype, s, dtype, d in deg_pairs:
            ntype, ids = (stype, s) if which == 0 else (dtype, d)
            parts.append(degrees[ntype][kind][ids.long()])
        return torch.cat(parts)

    norm_observed = edge_norm(w_obs, degree("deg_o", 0), degree("deg_o", 1))
    norm_augmented = edge_norm(w_aug, degree("deg_a", 0), degree("deg_a", 1))
    if rescale:
        scale = torch.cat(scales)
        norm_observed, norm_augmented = norm_observed * scale, norm_augmented * scale
    return Hop(
        src=src,
        dst=dst,
        norm_observed=norm_observed,
        norm_augmented=norm_augmented,
        num_src=su + si,
        num_dst=du + di,
        dst_in_src=torch.cat([torch.arange(du), su + torch.arange(di)]),
    )
