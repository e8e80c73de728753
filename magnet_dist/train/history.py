"""Historical embeddings for one-hop training (``train.history``).

A step of the exact mode samples all ``model.layers`` hops around its seeds, and at scale the
second hop reaches most of the graph (docs/benchmarks.md: 403k input nodes for 6k seeds). In
history mode a step samples only the hop nearest the seeds; layers 0 and 1 are propagated fresh
(gradients reach the ID embeddings of the sampled neighbours and the content projections), and
the deeper layers ``sum_{k=2..L} h_k`` of every output node come from this table, computed over
the whole training graph with the current parameters and refreshed every
``train.history_refresh_steps`` steps (VR-GCN / GNNAutoScale; LTGNN reaches LightGCN quality
with one propagated layer plus history). The deeper layers get no gradient: they are constants
between refreshes.

Rank 0 computes the whole table over the training graph (after a barrier, so every rank's
embedding updates are in), one content channel at a time, in float16, and broadcasts it; every
worker keeps its copy: no per-step network traffic at all, at the price of the training graph
on rank 0 during a refresh and the table (``2 views x nodes x M*d`` halves) on every worker.
With a fresh table and fanout -1 the history mode's forward equals the exact mode's
(tests/test_history.py).
"""

from __future__ import annotations

import time

import torch


class History:
    """The deeper layers of every node (users ``0..U-1``, items ``U..``; dataset ids), per view
    (``[U + I, M * d]``, float16), and when they were computed."""

    def __init__(self, num_users: int, num_items: int, refresh_steps: int) -> None:
        self.num_users, self.num_items = num_users, num_items
        self.refresh_steps = refresh_steps
        self.table: dict[str, torch.Tensor] = {}
        self.refreshed_at: int | None = None  # the step of the last refresh
        self.refreshes = 0
        self.seconds = 0.0  # spent refreshing (this attempt)

    def due(self, step: int, first_of_epoch: bool) -> bool:
        """A refresh is due before ``step``: none yet (start, or a resumed run), an epoch
        starts (``refresh_steps`` 0), or ``refresh_steps`` steps passed since the last one."""
        if self.refreshed_at is None:
            return True
        if self.refresh_steps == 0:
            return first_of_epoch and step != self.refreshed_at
        return step - self.refreshed_at >= self.refresh_steps

    @torch.no_grad()
    def refresh(self, model, graph, id_emb: torch.Tensor, step: int, device=None) -> None:
        """Recompute the table from ``graph`` (a :class:`~magnet_dist.train.reference.FullGraph`,
        whose hop is released afterwards) and ``id_emb``, the ID embeddings of every node
        (users then items, dataset ids), on the model's ``device``; the table stays on the
        CPU."""
        t = time.perf_counter()
        device = torch.device(device or "cpu")
        try:
            hop = graph.hop if device.type == "cpu" else graph.hop.to(device)
            table = model.encoder.deep_layers(
                hop,
                id_emb.to(device),
                {c: f.to(device) for c, f in graph.feats.items()},
                graph.is_item.to(device),
                dtype=torch.float16,
            )
            self.table = {v: x.cpu() for v, x in table.items()}
        finally:
            graph.release_hop()
        self.refreshed_at = step
        self.refreshes += 1
        self.seconds += time.perf_counter() - t

    def share(self, step: int, encoder, source: int = 0) -> None:
        """Broadcast rank ``source``'s freshly refreshed table to every rank (collective; the
        others hold no training graph and compute nothing). Counts the wait as refresh time."""
        import torch.distributed as dist

        from magnet_dist.parallel.device import collective_device

        t = time.perf_counter()
        rank = dist.get_rank()
        views = encoder.views if encoder.layers >= 2 else ()
        shape = (self.num_users + self.num_items, len(encoder.modalities) * encoder.dim)
        device = collective_device()
        for view in views:
            x = self.table[view] if rank == source else torch.empty(shape, dtype=torch.float16)
            x = x.to(device)
            dist.broadcast(x, source)
            self.table[view] = x.cpu()
        if rank != source:
            self.refreshed_at = step
            self.refreshes += 1
        self.seconds += time.perf_counter() - t

    def rows(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The deeper layers of output nodes ``users`` then ``items`` (dataset ids), float32;
        None when the model has one layer (nothing deeper)."""
        if self.refreshed_at is None:
            raise RuntimeError("History.rows before the first refresh")
        if not self.table:
            return None
        idx = torch.cat([users.long(), items.long() + self.num_users])
        return {v: t[idx].float() for v, t in self.table.items()}


def history_for(cfg, ds, computes: bool = True):
    """``train.history``: an empty :class:`History` and the full training graph it is
    refreshed from (:class:`~magnet_dist.train.reference.FullGraph`; None unless ``computes``,
    for ranks that receive the table); else ``(None, None)``."""
    if not cfg.train.history:
        return None, None
    history = History(ds.num_users, ds.num_items, cfg.train.history_refresh_steps)
    if not computes:
        return history, None
    from magnet_dist.graph.content import read_content_edges
    from magnet_dist.train.reference import FullGraph

    edges = read_content_edges(cfg.data.path) if cfg.model.content_view else None
    return history, FullGraph(ds, cfg, edges)


def refresh_from_client(history: History, model, graph, client, step: int, device=None) -> None:
    """Refresh ``history`` with the current ID embeddings of every node, read from the graph
    client's DistEmbeddings (the caller makes sure every worker's updates are in)."""
    with torch.no_grad():
        emb = torch.cat(
            [
                client.embeddings("user", torch.arange(client.num_users)),
                client.embeddings("item", torch.arange(client.num_items)),
            ]
        )
    history.refresh(model, graph, emb, step, device)
