"""Specification tests for the triplet-template MoE head and the router."""

import itertools
import math

import pytest
import torch

from magnet_dist.config import load_config
from magnet_dist.model.experts import build_experts, build_templates
from magnet_dist.model.magnet import build_dense_moe
from magnet_dist.model.router import (
    capacity_for,
    entropy,
    queue_positions,
    routing_stats,
    top_k_route,
)

MODS = ["behaviour", "visual", "text"]


def test_default_pool_has_nine_templates_in_three_families():
    t = build_templates(MODS, ["dominant", "balanced", "complementary"])
    assert [x.family for x in t] == ["dominant"] * 3 + ["balanced"] * 3 + ["complementary"] * 3
    assert [x.name for x in t[:3]] == ["D_behaviour", "D_visual", "D_text"]


def test_dominant_template_weights():
    t = build_templates(MODS, ["dominant"], alpha=0.7)
    assert t[1].weights == pytest.approx((0.15, 0.7, 0.15))
    for x in t:
        assert sum(x.weights) == pytest.approx(1.0)


def test_balanced_template_weights():
    t = build_templates(MODS, ["balanced"], beta=0.45)
    assert t[0].name == "B_behaviour+visual"
    assert t[0].weights == pytest.approx((0.45, 0.45, 0.1))
    assert t[2].weights == pytest.approx((0.1, 0.45, 0.45))


def test_complementary_template_mixes_gated_pair_and_third():
    t = build_templates(MODS, ["complementary"], delta=0.1)[1]  # behaviour | text
    assert t.pair == (0, 2) and t.weights == (0.0, 1.0, 0.0) and t.delta == 0.1
    expert = build_experts(MODS, ["complementary"], 1, 4, 8, 0.7, 0.45, 0.1)[1]
    z = torch.randn(5, 3, 4)
    g = torch.sigmoid(expert.gate(torch.cat([z[:, 0], z[:, 2]], 1)))
    want = 0.9 * (g * z[:, 0] + (1 - g) * z[:, 2]) + 0.1 * z[:, 1]
    assert torch.allclose(expert.template_input(z.reshape(5, 12)), want, atol=1e-6)


def test_two_modalities_balanced_pair_takes_everything():
    t = build_templates(["behaviour", "text"], ["balanced", "complementary"])
    assert t[0].weights == pytest.approx((0.5, 0.5))
    assert t[1].delta == 0.0


def test_family_combination_and_expert_splitting_sizes():
    cfg = load_config(overrides=["moe.families=[dominant,complementary]"])
    assert len(build_dense_moe(cfg, MODS).experts) == 6
    cfg = load_config(overrides=["moe.experts_per_template=3"])
    moe = build_dense_moe(cfg, MODS)
    assert len(moe.experts) == 27
    assert [e.template.name for e in moe.experts[:3]] == ["D_behaviour"] * 3
    w = [e.mlp[0].weight for e in moe.experts[:3]]
    assert not torch.equal(w[0], w[1])  # separate weights per copy


def test_topk_combine_weights_sum_to_one_and_match_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(20, 9)
    for k in range(1, 7):
        r = top_k_route(logits, k, capacity=None)
        assert torch.allclose(r.combine.sum(1), torch.ones(20), atol=1e-6)
        p = torch.softmax(logits, 1)
        for q in range(20):
            best = sorted(range(9), key=lambda e: -p[q, e].item())[:k]
            assert r.experts[q].tolist() == best
            want = p[q, best] / p[q, best].sum()
            assert torch.allclose(r.combine[q], want, atol=1e-6)


def test_queue_positions_are_choice_rank_major():
    experts = torch.tensor([[0, 1], [0, 2], [1, 0]])
    # expert 0 queue: tok0(1st), tok1(1st), tok2(2nd); expert 1: tok2(1st), tok0(2nd)
    assert queue_positions(experts, 3).tolist() == [[0, 1], [1, 0], [0, 2]]


def test_capacity_drops_are_counted():
    logits = torch.tensor([[5.0, 0, 0]] * 4)  # everyone wants expert 0
    r = top_k_route(logits, 1, capacity=2)
    assert r.kept.squeeze(1).tolist() == [True, True, False, False]
    s = routing_stats(r)
    assert s.dropped.item() == 2 and s.load.tolist() == [2, 0, 0]
    assert capacity_for(4, 3, 1, None) is None
    assert capacity_for(4, 3, 1, 1.0) == 2


def test_no_drop_capacity_factor_never_drops():
    torch.manual_seed(1)
    logits = torch.randn(50, 9) * 5
    cap = capacity_for(50, 9, 2, 9 / 2)  # factor >= E/K
    assert top_k_route(logits, 2, cap).kept.all()


def test_entropy_formulas_on_hand_made_distributions():
    uniform = torch.full((4, 4), 0.25)
    one_hot = torch.eye(4)
    r = top_k_route(torch.log(uniform), 1, None)
    s = routing_stats(r)
    assert s.h_conf().item() == pytest.approx(1.0, abs=1e-6)
    assert s.h_use().item() == pytest.approx(1.0, abs=1e-6)
    r = top_k_route(torch.log(one_hot.clamp_min(1e-30)), 1, None)
    s = routing_stats(r)
    assert s.h_conf().item() == pytest.approx(0.0, abs=1e-5)  # each token confident
    assert s.h_use().item() == pytest.approx(1.0, abs=1e-5)  # all experts used equally
    assert s.l_aux().item() == pytest.approx(1.0, abs=1e-5)  # balanced
    collapsed = torch.tensor([[30.0, 0, 0, 0]] * 4)
    s = routing_stats(top_k_route(collapsed, 1, None))
    assert s.h_use().item() == pytest.approx(0.0, abs=1e-5)
    assert s.l_aux().item() == pytest.approx(4.0, abs=1e-4)
    assert entropy(torch.tensor([[0.5, 0.5]])).item() == pytest.approx(math.log(2))


def test_dense_moe_output_matches_per_token_reference():
    torch.manual_seed(2)
    cfg = load_config(overrides=["model.dim=8", "moe.top_k=3"])
    moe = build_dense_moe(cfg, MODS)
    x = torch.randn(12, 24)
    out, _ = moe(x)
    r = moe.router(x, None)
    for q in range(12):
        want = sum(
            r.combine[q, j] * moe.experts[int(r.experts[q, j])](x[q : q + 1])[0] for j in range(3)
        )
        assert torch.allclose(out[q], want, atol=1e-5)


def test_stats_reduce_of_two_halves_equals_whole():
    torch.manual_seed(3)
    logits = torch.randn(10, 9)
    whole = routing_stats(top_k_route(logits, 2, None))
    a = routing_stats(top_k_route(logits[:4], 2, None))
    b = routing_stats(top_k_route(logits[4:], 2, None))
    merged = a.reduce(lambda t: t + b.packed())
    for f in ["h_conf", "h_use", "l_aux"]:
        assert getattr(merged, f)().item() == pytest.approx(getattr(whole, f)().item(), abs=1e-6)
    for f in ["assigned", "load", "gate_mass", "prob_sum"]:
        assert torch.allclose(getattr(merged, f), getattr(whole, f), atol=1e-5), f


def test_stats_reduce_is_one_collective():
    """Every worker waits for the slowest at each collective: the routing sums go in one."""
    stats = routing_stats(top_k_route(torch.randn(10, 9), 2, None))
    calls = []
    stats.reduce(lambda t: calls.append(t.shape) or t)
    assert calls == [(1 + 9 + 9 + 9 + 1 + 1 + 9,)]


@pytest.mark.parametrize("k", [1, 2])
def test_free_experts_ablation_sees_whole_token(k):
    cfg = load_config(overrides=["model.templates=false", "model.dim=4", f"moe.top_k={k}"])
    moe = build_dense_moe(cfg, MODS)
    assert all(e.template.family == "free" for e in moe.experts)
    assert moe.experts[0].mlp[0].in_features == 12
    out, _ = moe(torch.randn(3, 12))
    assert out.shape == (3, 4)


def test_all_k_in_range_work():
    for k, p in itertools.product(range(1, 7), [1, 2]):
        cfg = load_config(overrides=[f"moe.top_k={k}", f"moe.experts_per_template={p}"])
        out, stats = build_dense_moe(cfg, MODS)(torch.randn(7, 192))
        assert out.shape == (7, 64) and stats.assigned.sum().item() == 7 * k


def test_loss_groups_each_users_tokens_so_capacity_drops_do_not_track_the_label():
    """With a capacity factor, a user's negatives follow its positive in the MoE's token order
    (with the order [all positives; all negatives] capacity drops would fall on the negatives
    only); without one nothing is dropped, the order is left as it is, and the loss is the BPR of
    scoring positives and negatives separately."""
    from magnet_dist.model.magnet import MagnetModel, pair_grouped_order
    from magnet_dist.model.schedule import ScheduleState

    assert pair_grouped_order(3, 2).tolist() == [0, 3, 4, 1, 5, 6, 2, 7, 8]
    reps = lambda n: {m: torch.randn(n, 4) for m in ("behaviour", "visual", "text")}  # noqa: E731
    hu, hpos, hneg = reps(5), reps(5), reps(10)
    hu_rep = {m: v.repeat_interleave(2, 0) for m, v in hu.items()}
    row = lambda reps, r: {m: v[r : r + 1] for m, v in reps.items()}  # noqa: E731
    for capacity in (None, 1.0):
        extra = [] if capacity is None else [f"moe.capacity_factor={capacity}"]
        torch.manual_seed(0)
        model = MagnetModel(
            load_config(overrides=["model.dim=4", *extra]), {"visual": 3, "text": 3}
        )
        torch.nn.init.normal_(model.readout.weight)
        seen = []
        moe_forward = model.moe.forward
        model.moe.forward = lambda x, explore=False: (seen.append(x), moe_forward(x, explore))[1]  # noqa: B023
        out = model.loss(hu, hpos, hneg, torch.zeros(1, 4), ScheduleState())
        if capacity is None:  # [all positives; all negatives]: row 1 is user 1's positive
            assert torch.equal(seen[0][1], model.token(row(hu, 1), row(hpos, 1))[0])
            pos, _ = model.score(hu, hpos)
            neg, _ = model.score(hu_rep, hneg)
            want = torch.nn.functional.softplus(neg - pos.repeat_interleave(2)).mean()
            assert out.bpr.item() == pytest.approx(want.item(), rel=1e-5)
        else:  # grouped: row 1 is user 0's first negative
            assert torch.equal(seen[0][1], model.token(row(hu, 0), row(hneg, 0))[0])
            assert out.stats.dropped.item() > 0  # the capacity path ran


def _loop_mixture(moe, tokens, routing):
    """The straightforward form of the head's mixture: each expert on the tokens routed to it
    (masked gather), weighted by its combine weight, added back token by token."""
    out = tokens.new_zeros(tokens.shape[0], moe.dim)
    for e, expert in enumerate(moe.experts):
        token_idx, slot = ((routing.experts == e) & routing.kept).nonzero(as_tuple=True)
        if token_idx.numel():
            y = expert(tokens[token_idx]) * routing.combine[token_idx, slot].unsqueeze(1)
            out = out.index_add(0, token_idx, y)
    return out


@pytest.mark.parametrize(
    "overrides, n",
    [
        ([], 64),  # the default pool: dominant, balanced, complementary, K = 2
        (["moe.top_k=3", "moe.experts_per_template=2"], 50),
        (["moe.top_k=1"], 5),  # fewer tokens than experts: most experts get none
        (["model.templates=false"], 40),  # free experts see the whole token
        (["moe.capacity_factor=0.5"], 64),  # training-time capacity drops
        (["moe.families=[complementary]", "moe.top_k=1"], 30),
    ],
)
def test_grouped_experts_match_per_expert_loop_forward_and_gradients(overrides, n):
    """The head runs its experts on one expert-sorted gather; outputs and every gradient (the
    tokens', the router's, each expert's) match the masked per-expert loop."""
    torch.manual_seed(7)
    cfg = load_config(overrides=["model.dim=8", *overrides])
    moe = build_dense_moe(cfg, MODS)
    for p in moe.parameters():  # biases too, so no expert is a no-op
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(n, 24, requires_grad=True)
    w = torch.randn(n, 8)

    out, stats = moe(x)
    (out * w).sum().backward()
    got = {"x": x.grad, **{k: p.grad for k, p in moe.named_parameters()}}
    moe.zero_grad(set_to_none=True)
    x.grad = None

    capacity = capacity_for(n, moe.num_experts, moe.router.top_k, moe.capacity_factor)
    routing = moe.router(x, capacity)
    want_out = _loop_mixture(moe, x, routing)
    (want_out * w).sum().backward()
    want = {"x": x.grad, **{k: p.grad for k, p in moe.named_parameters()}}

    assert torch.allclose(out, want_out, atol=1e-5, rtol=1e-5)
    if moe.capacity_factor is not None:
        assert stats.dropped.item() > 0  # the drop path was exercised
    if n < moe.num_experts:
        assert (stats.load == 0).any()  # so was an expert without tokens
    for k in want:
        if want[k] is None:  # an expert no token reached: no gradient either way
            assert got[k] is None, k
            continue
        assert torch.allclose(got[k], want[k], atol=1e-5, rtol=1e-4), k
