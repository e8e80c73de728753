"""(III) Dual-view encoding: LightGCN per modality channel on the observed and augmented views.

Channels: ``behaviour`` (ID embeddings) and one per content modality (items: ``P_c(x_i^c)``,
users: 0, so a user's content representation comes from propagation alone). Both views run the
same weight-free propagation over the same hops with different edge norms, then a learned scalar
per modality fuses them: ``H^m = (1 - lambda_m) H_o^m + lambda_m H_a^m``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from magnet_dist.model.hops import Hop

BEHAVIOUR = "behaviour"


class DualViewEncoder(nn.Module):
    def __init__(
        self,
        content_dims: dict[str, int],
        dim: int = 64,
        layers: int = 2,
        content_view: bool = True,
        fusion: str = "learned",
        fusion_init: float = 0.5,
    ) -> None:
        super().__init__()
        self.modalities = [BEHAVIOUR, *content_dims]
        self.dim = dim
        self.layers = layers
        self.content_view = content_view
        self.projections = nn.ModuleDict(
            {c: nn.Linear(d_c, dim) for c, d_c in content_dims.items()}
        )
        init = torch.full((len(self.modalities),), _logit(fusion_init))
        if fusion == "learned":
            self.fusion_logit = nn.Parameter(init)
        else:
            self.register_buffer("fusion_logit", init)

    @property
    def fusion_weights(self) -> torch.Tensor:
        """lambda_m per modality (share of the augmented view); 0 when that view is off."""
        lam = torch.sigmoid(self.fusion_logit)
        return lam if self.content_view else torch.zeros_like(lam)

    def layer0(
        self, id_emb: torch.Tensor, feats: dict[str, torch.Tensor], is_item: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer-0 inputs: behaviour ``[n, d]`` (every input node) and the content channels
        concatenated ``[n_items, C*d]`` (item rows only, in the order of ``is_item``'s True
        entries; users' content input is 0, and at scale most input nodes are users), or None
        without content modalities.

        ``feats[c]`` holds either every input node's row or only the item rows."""
        if len(self.modalities) == 1:
            return id_emb, None
        item_idx = torch.nonzero(is_item, as_tuple=True)[0]
        parts = []
        for c in self.modalities[1:]:
            x = feats[c]
            if x.shape[0] != item_idx.numel():
                x = x[item_idx]
            parts.append(self.projections[c](x))
        return id_emb, torch.cat(parts, dim=1)

    def propagate(
        self,
        behaviour: torch.Tensor,
        content: torch.Tensor | None,
        is_item: torch.Tensor,
        hops: list[Hop],
        view: str,
    ) -> torch.Tensor:
        """Sum over layers 0..L of LightGCN propagation, restricted to the last hop's dst nodes,
        all channels concatenated ``[n_out, M*d]``. The first hop reads the content channels
        from item rows only (their user rows are zero)."""
        if not hops:
            if content is None:
                return behaviour
            return torch.cat([behaviour, _items_among(content, is_item, None)], 1)
        first = hops[0]
        h = first.propagate(behaviour, view)
        total = behaviour[first.dst_in_src]
        if content is not None:
            h = torch.cat([h, first.propagate(content, view, src_mask=is_item)], dim=1)
            total = torch.cat([total, _items_among(content, is_item, first.dst_in_src)], 1)
        total = total + h
        for hop in hops[1:]:
            h = hop.propagate(h, view)
            total = total[hop.dst_in_src] + h
        return total

    @property
    def views(self) -> tuple[str, ...]:
        return ("observed", "augmented") if self.content_view else ("observed",)

    def deep_layers(
        self,
        hop: Hop,
        id_emb: torch.Tensor,
        feats: dict[str, torch.Tensor],
        is_item: torch.Tensor,
        dtype: torch.dtype = torch.float32,
    ) -> dict[str, torch.Tensor]:
        """``sum_{k=2..L} h_k`` per view for every node of the full-graph ``hop`` (all
        channels concatenated, ``[n, M*d]`` in ``dtype``): the layers a history-mode step takes
        from its table (train/history.py). Empty with fewer than two layers. One channel at a
        time, so the working memory is a few ``[n, d]`` blocks whatever M is."""
        if self.layers < 2:
            return {}
        behaviour, content = self.layer0(id_emb, feats, is_item)
        channels = [(behaviour, None)]
        if content is not None:
            d = self.dim
            channels += [
                (content[:, c * d : (c + 1) * d], is_item) for c in range(len(self.modalities) - 1)
            ]
        out = {}
        for view in self.views:
            blocks = []
            for x, mask in channels:
                h = hop.propagate(x, view, src_mask=mask)
                deep = torch.zeros_like(h)
                for _ in range(1, self.layers):
                    h = hop.propagate(h, view)
                    deep += h
                blocks.append(deep.to(dtype))
            out[view] = torch.cat(blocks, dim=1)
            hop.release_matrices()  # one view's matrices at a time
        return out

    def forward(
        self,
        hops: list[Hop],
        id_emb: torch.Tensor,
        feats: dict[str, torch.Tensor],
        is_item_in: torch.Tensor,
        is_item_out: torch.Tensor,
        deep: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Fused representation per modality for the output nodes of ``hops``.

        ``id_emb``/``feats``/``is_item_in`` describe the first hop's src nodes; ``is_item_out``
        the last hop's dst nodes (users and items may both be outputs). ``deep``: the history
        mode's layers beyond ``hops`` per view (rows = output nodes, from :meth:`deep_layers`),
        added to the propagated ones; the layer mean then counts ``self.layers`` layers.
        """
        behaviour, content = self.layer0(id_emb, feats, is_item_in)
        observed = self.propagate(behaviour, content, is_item_in, hops, "observed")
        if self.content_view:
            augmented = self.propagate(behaviour, content, is_item_in, hops, "augmented")
        layers = len(hops)
        if deep is not None:
            observed = observed + deep["observed"]
            if self.content_view:
                augmented = augmented + deep["augmented"]
            layers = self.layers
        # Mean over layers: 0..L for items and for behaviour, 1..L for users' content channels
        # (their layer 0 is zero by definition).
        denom_all = float(layers + 1)
        denom_user_content = float(max(layers, 1))
        lam = self.fusion_weights
        out: dict[str, torch.Tensor] = {}
        d = self.dim
        for m_idx, m in enumerate(self.modalities):
            sl = slice(m_idx * d, (m_idx + 1) * d)
            h = observed[:, sl]
            if self.content_view:
                h = (1 - lam[m_idx]) * h + lam[m_idx] * augmented[:, sl]
            if m_idx == 0:
                h = h / denom_all
            else:
                denom = torch.where(is_item_out, denom_all, denom_user_content).to(h.dtype)
                h = h / denom.unsqueeze(1)
            out[m] = h
        return out


def _items_among(
    content: torch.Tensor, is_item: torch.Tensor, rows: torch.Tensor | None
) -> torch.Tensor:
    """Layer-0 content at the input rows ``rows`` (all when None): an item's own row of
    ``content`` (item rows only, in ``is_item`` order), zeros for users."""
    rows = torch.arange(is_item.numel(), device=is_item.device) if rows is None else rows
    at = torch.nonzero(is_item[rows], as_tuple=True)[0]
    item_pos = (torch.cumsum(is_item, 0) - 1)[rows[at]]
    return content.new_zeros(rows.numel(), content.shape[1]).index_put((at,), content[item_pos])


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))
