"""Routing diagnostics that cannot hide a collapse (H_load on the hard Top-K assignments), the
trigger on that quantity, and scoring that never drops a token in eval mode."""

import math

import pytest
import torch

from magnet_dist.config import RoutingConfig, load_config
from magnet_dist.model.magnet import build_dense_moe
from magnet_dist.model.router import routing_stats, top_k_route
from magnet_dist.model.schedule import ScheduleState, advance, trigger_signal
from magnet_dist.train.common import epoch_routing

E, K, N = 9, 2, 900


def collapsed_logits(n: int = N, e: int = E) -> torch.Tensor:
    """Near-uniform probabilities, but experts 0 and 1 always a hair ahead: every token's Top-2
    is {0, 1}. This is the collapse the soft entropies missed on MovieLens."""
    logits = torch.randn(n, e) * 1e-3
    logits[:, :2] += 0.01
    return logits


def uniform_assignment_logits(n: int = N, e: int = E, k: int = K) -> torch.Tensor:
    """Token q prefers experts q mod E and q+1 mod E: every expert is in exactly 2N/E Top-Ks."""
    logits = torch.zeros(n, e)
    q = torch.arange(n)
    logits[q, q % e] = 2.0
    logits[q, (q + 1) % e] = 1.0
    return logits


def test_h_load_is_zero_when_every_token_goes_to_one_expert_while_soft_h_use_is_one():
    logits = torch.randn(N, E) * 1e-3
    logits[:, 3] += 0.01  # expert 3 first for everyone, by a hair
    stats = routing_stats(top_k_route(logits, 1, None))
    assert stats.h_load().item() == pytest.approx(0.0, abs=1e-9)
    assert stats.hard_usage()[3].item() == 1.0
    assert stats.h_use().item() > 0.999  # the soft reading sees nothing wrong
    assert stats.h_conf().item() > 0.999


def test_h_load_of_a_collapsed_top2_is_log2_over_log_e():
    stats = routing_stats(top_k_route(collapsed_logits(), K, None))
    assert stats.hard_usage().tolist() == pytest.approx([0.5, 0.5] + [0.0] * (E - 2))
    assert stats.h_load().item() == pytest.approx(math.log(2) / math.log(E), rel=1e-6)
    assert stats.h_use().item() > 0.999


def test_h_load_is_one_for_uniform_assignments():
    stats = routing_stats(top_k_route(uniform_assignment_logits(), K, None))
    assert stats.hard_usage().tolist() == pytest.approx([1 / E] * E)
    assert stats.h_load().item() == pytest.approx(1.0, rel=1e-6)


def test_h_load_of_reduced_stats_is_the_global_one():
    """Sums reduced over two 'workers' give the H_load of the concatenated batch."""
    a = routing_stats(top_k_route(collapsed_logits(300), K, None))
    b = routing_stats(top_k_route(uniform_assignment_logits(600), K, None))

    def fake_all_reduce(t):  # the sum of every field over both parts (one packed tensor)
        return t + b.packed()

    both = routing_stats(
        top_k_route(torch.cat([collapsed_logits(300), uniform_assignment_logits(600)]), K, None)
    )
    reduced = a.reduce(fake_all_reduce)
    assert reduced.h_load().item() == pytest.approx(both.h_load().item(), rel=1e-6)
    assert 0.5 < reduced.h_load().item() < 1.0


def test_epoch_routing_sums_one_epochs_rows_of_metrics_csv(tmp_path):
    """The metrics.json summary comes from metrics.csv (continuous across a resume): per-expert
    loads of one epoch's steps, summed, as shares; experts never loaded are counted."""
    rows = [
        "step,epoch,loss,load_0,load_1,load_2,load_3",
        "1,0,0.7,10,0,0,0",  # epoch 0: all on expert 0
        "2,1,0.6,4,4,0,0",
        "3,1,0.6,2,6,0,0",  # epoch 1: 6 + 10 of 16 on experts 0, 1
    ]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    s = epoch_routing(tmp_path, 1)
    assert s["load_share"] == pytest.approx([6 / 16, 10 / 16, 0, 0])
    assert s["zero_load_experts"] == 2 and s["steps"] == 2
    p = [6 / 16, 10 / 16]
    assert s["h_load"] == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(4))
    assert epoch_routing(tmp_path, 0)["h_load"] == 0.0
    assert epoch_routing(tmp_path, 2) is None


def run_trigger(logits_fn, cfg: RoutingConfig, steps: int) -> list[ScheduleState]:
    state, states = ScheduleState(), []
    for _ in range(steps):
        stats = routing_stats(top_k_route(logits_fn(), K, None))
        state = advance(state, trigger_signal(stats, cfg), cfg)
        states.append(state)
    return states


def test_collapsed_router_does_not_fire_the_hard_trigger_before_max_steps():
    cfg = RoutingConfig(tau=0.9, window=5, min_steps=10, max_steps=40)
    states = run_trigger(collapsed_logits, cfg, 50)
    assert all(s.stage == "coverage" for s in states[:39])
    assert states[-1].switch_step == 40 and states[-1].forced


def test_collapsed_router_fires_the_soft_trigger_at_min_steps():
    """The literal soft reading is blind: the same collapsed router switches at S_min."""
    cfg = RoutingConfig(trigger_on="soft", tau=0.9, window=5, min_steps=10, max_steps=40)
    states = run_trigger(collapsed_logits, cfg, 50)
    assert states[-1].switch_step == 10 and not states[-1].forced


def test_balanced_router_fires_the_hard_trigger_at_min_steps_not_before():
    cfg = RoutingConfig(tau=0.9, window=5, min_steps=10, max_steps=40)
    states = run_trigger(uniform_assignment_logits, cfg, 50)
    assert all(s.stage == "coverage" for s in states[:9])
    assert states[-1].switch_step == 10 and not states[-1].forced


def test_eval_scores_do_not_depend_on_the_chunk_with_a_small_capacity_factor():
    """Training drops tokens at capacity; eval mode never does, so a pair scored alone or in a
    big chunk gets the same MoE output."""
    cfg = load_config(overrides=["model.dim=8", "moe.capacity_factor=0.25", "moe.top_k=2"])
    torch.manual_seed(0)
    moe = build_dense_moe(cfg, ["behaviour", "visual", "text"])
    tokens = torch.randn(400, 24)
    alone = lambda: torch.cat([moe(tokens[q : q + 1])[0] for q in range(len(tokens))])  # noqa: E731
    with torch.no_grad():
        moe.train()
        big, stats = moe(tokens)
        assert stats.dropped.item() > 0  # the factor really drops tokens in training ...
        assert not torch.allclose(alone(), big, atol=1e-4)  # ... which changes scores there
        moe.eval()
        big, stats = moe(tokens)
        assert stats.dropped.item() == 0
        torch.testing.assert_close(alone(), big, atol=1e-6, rtol=1e-5)


def test_l_aux_gradient_acts_on_the_actual_assignments():
    """GShard's l_aux multiplies hard counts by soft probabilities: on a collapsed router its
    gradient lowers the logits of the two experts every token is sent to and raises the others,
    although its value (~1) and the soft H_use (~1) look balanced."""
    logits = collapsed_logits().requires_grad_()
    stats = routing_stats(top_k_route(logits, K, None))
    assert stats.l_aux().item() == pytest.approx(1.0, abs=0.02)
    stats.l_aux().backward()
    step = -logits.grad.sum(0)  # direction of a descent step, per expert
    assert (step[:2] < 0).all() and (step[2:] > 0).all()


def test_ranking_scores_are_eval_mode_even_for_a_model_left_in_training_mode():
    """pair_score_fn (used by every ranking path, including the distributed trainer's in-loop
    evaluation, which hands over its training-mode model) scores in eval mode: a pair's score in
    a 40 x 30 block equals its score alone, with capacity_factor 0.25; the mode is restored."""
    from magnet_dist.eval.scoring import pair_score_fn
    from magnet_dist.model.magnet import MagnetModel

    cfg = load_config(overrides=["model.dim=8", "moe.capacity_factor=0.25", "moe.dropout=0.5"])
    torch.manual_seed(0)
    model = MagnetModel(cfg, {"visual": 4, "text": 4})
    torch.nn.init.normal_(model.readout.weight)
    hu = {m: torch.randn(40, 8) for m in model.modalities}
    hi = {m: torch.randn(30, 8) for m in model.modalities}
    model.train()
    block = pair_score_fn(model)(hu, hi)
    assert model.training
    for u, i in [(0, 0), (7, 29), (39, 12)]:
        alone = pair_score_fn(model)(
            {m: v[u : u + 1] for m, v in hu.items()}, {m: v[i : i + 1] for m, v in hi.items()}
        )
        assert alone[0, 0].item() == pytest.approx(block[u, i].item(), rel=1e-5, abs=1e-6)
