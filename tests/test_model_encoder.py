"""LightGCN propagation and dual-view fusion against the dense formula."""

import torch

from magnet_dist.model.encoder import DualViewEncoder
from magnet_dist.model.hops import full_graph_hop


def dense_adj(n, src, dst, w):
    a = torch.zeros(n, n)
    a[dst, src] = w
    return a


def sym_norm(a):
    deg = a.sum(1)
    d = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
    return d[:, None] * a * d[None, :]


def test_lightgcn_matches_dense_formula_both_views():
    torch.manual_seed(0)
    U, n_items, d, L = 4, 5, 3, 2
    tu = torch.tensor([0, 0, 1, 2, 3, 3])
    ti = torch.tensor([0, 1, 1, 2, 3, 4])
    cs, cd, cw = (
        torch.tensor([0, 1, 2, 4]),
        torch.tensor([1, 0, 4, 2]),
        torch.tensor([0.8, 0.8, 0.3, 0.3]),
    )
    hop = full_graph_hop(U, n_items, tu, ti, cs, cd, cw)
    n = U + n_items
    ui = dense_adj(n, torch.cat([tu, ti + U]), torch.cat([ti + U, tu]), 1.0)
    ii = dense_adj(n, cs + U, cd + U, cw)
    a_obs, a_aug = sym_norm(ui), sym_norm(ui + ii)
    enc = DualViewEncoder({"text": 2}, dim=d, layers=L, fusion="fixed", fusion_init=0.3)
    emb = torch.randn(n, d)
    feats = {"text": torch.randn(n, 2)}
    is_item = torch.arange(n) >= U
    out = enc([hop] * L, emb, feats, is_item, is_item)
    behaviour, content = enc.layer0(emb, feats, is_item)
    assert content.shape == (n_items, d)  # item rows only: users have no content of their own
    h0 = torch.cat([behaviour, torch.zeros(n, d).index_put((is_item.nonzero()[:, 0],), content)], 1)

    def mean_layers(a, x):
        layers = [x]
        for _ in range(L):
            layers.append(a @ layers[-1])
        return torch.stack(layers)

    lam = torch.sigmoid(enc.fusion_logit)
    for m_idx, m in enumerate(["behaviour", "text"]):
        x = h0[:, m_idx * d : (m_idx + 1) * d]
        lo, la = mean_layers(a_obs, x), mean_layers(a_aug, x)
        fused = (1 - lam[m_idx]) * lo + lam[m_idx] * la  # [L+1, n, d]
        want = fused.sum(0) / (L + 1)
        if m_idx > 0:  # users' content channel: mean over layers 1..L
            want[:U] = fused[1:, :U].sum(0) / L
        assert torch.allclose(out[m], want, atol=1e-5), m


def test_content_view_off_is_observed_view_only():
    U, n_items = 2, 3
    hop = full_graph_hop(
        U,
        n_items,
        torch.tensor([0, 1]),
        torch.tensor([0, 2]),
        torch.tensor([0, 1]),
        torch.tensor([1, 0]),
        torch.tensor([0.9, 0.9]),
    )
    emb = torch.randn(5, 4)
    is_item = torch.arange(5) >= U
    on = DualViewEncoder({}, dim=4, layers=1, content_view=True, fusion_init=0.5)
    off = DualViewEncoder({}, dim=4, layers=1, content_view=False)
    a = on([hop], emb, {}, is_item, is_item)["behaviour"]
    b = off([hop], emb, {}, is_item, is_item)["behaviour"]
    assert not torch.allclose(a[U:], b[U:])  # item-item edges change item reps
    assert off.fusion_weights.sum() == 0


def test_propagate_forward_and_backward_match_dense_matrix():
    """CSR product with its cached transpose == dense ``A @ h`` and ``A^T @ grad``, also with the
    src columns restricted to a mask (layer-0 content, item rows only) and duplicate edges."""
    torch.manual_seed(1)
    U, n_items = 6, 7
    tu = torch.tensor([0, 0, 1, 2, 3, 4, 5, 5, 5])
    ti = torch.tensor([0, 1, 1, 2, 3, 4, 5, 6, 6])  # (5, 6) twice
    hop = full_graph_hop(
        U, n_items, tu, ti, torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0.5, 0.5])
    )
    n = U + n_items
    is_item = torch.arange(n) >= U
    for view in ("observed", "augmented"):
        norm = hop.norm_observed if view == "observed" else hop.norm_augmented
        dense = torch.zeros(n, n).index_put_((hop.dst, hop.src), norm, accumulate=True)
        for mask, a in ((None, dense), (is_item, dense[:, is_item])):
            h = torch.randn(a.shape[1], 3, requires_grad=True)
            g = torch.randn(n, 3)
            out = hop.propagate(h, view, src_mask=mask)
            assert torch.allclose(out, a @ h, atol=1e-6)
            (grad,) = torch.autograd.grad(out, h, g)
            assert torch.allclose(grad, a.T @ g, atol=1e-6)


def test_zero_layers_is_layer0():
    """layers=0: the representation is the layer-0 input (items' own content, zeros for users)."""
    U, n_items, d = 2, 3, 4
    emb = torch.randn(U + n_items, d)
    feats = {"text": torch.randn(n_items, 5)}
    is_item = torch.arange(U + n_items) >= U
    enc = DualViewEncoder({"text": 5}, dim=d, layers=0, content_view=False)
    out = enc([], emb, feats, is_item, is_item)
    assert torch.allclose(out["behaviour"], emb)
    assert torch.all(out["text"][:U] == 0)
    assert torch.allclose(out["text"][U:], enc.projections["text"](feats["text"]))
