"""The entropy-triggered schedule on synthetic H_use sequences."""

import pytest

from magnet_dist.config import RoutingConfig
from magnet_dist.model.schedule import (
    COVERAGE,
    SPECIALISATION,
    ScheduleState,
    advance,
    ramp,
)


def run(seq, cfg):
    state = ScheduleState()
    states = []
    for h in seq:
        state = advance(state, h, cfg)
        states.append(state)
    return states


def switch_step(states):
    return next((s.switch_step for s in states if s.stage == SPECIALISATION), None)


def test_trigger_fires_after_window_of_high_ema():
    cfg = RoutingConfig(ema_decay=0.0, tau=0.9, window=5, min_steps=0, max_steps=1000)
    states = run([0.5] * 10 + [0.95] * 20, cfg)
    assert switch_step(states) == 15  # steps 11..15 are the 5 consecutive high steps
    assert not states[-1].forced


def test_trigger_resets_window_when_ema_dips():
    cfg = RoutingConfig(ema_decay=0.0, tau=0.9, window=5, min_steps=0, max_steps=1000)
    states = run([0.95] * 4 + [0.5] + [0.95] * 10, cfg)
    assert switch_step(states) == 10


def test_trigger_never_fires_before_min_steps():
    cfg = RoutingConfig(ema_decay=0.0, tau=0.9, window=5, min_steps=50, max_steps=1000)
    states = run([0.99] * 100, cfg)
    assert switch_step(states) == 50
    assert all(s.stage == COVERAGE for s in states[:49])


def test_trigger_forced_at_max_steps():
    cfg = RoutingConfig(tau=0.9, window=5, min_steps=0, max_steps=30)
    states = run([0.2] * 40, cfg)
    assert switch_step(states) == 30 and states[-1].forced


def test_ema_smooths_h_use():
    cfg = RoutingConfig(ema_decay=0.5, tau=0.9, window=1, min_steps=0, max_steps=1000)
    states = run([0.0, 1.0, 1.0, 1.0], cfg)
    assert [s.ema for s in states] == pytest.approx([0.0, 0.5, 0.75, 0.875])
    assert switch_step(states) is None


def test_single_stage_never_switches():
    cfg = RoutingConfig(two_stage=False, min_steps=0, window=1, max_steps=3)
    assert all(s.stage == COVERAGE for s in run([1.0] * 10, cfg))


def test_state_round_trip_resumes_identically():
    cfg = RoutingConfig(ema_decay=0.8, tau=0.9, window=4, min_steps=3, max_steps=1000)
    seq = [0.5, 0.97, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99]
    full = run(seq, cfg)
    state = ScheduleState()
    for h in seq[:6]:
        state = advance(state, h, cfg)
    state = ScheduleState.from_dict(state.to_dict())
    for h in seq[6:]:
        state = advance(state, h, cfg)
    assert state == full[-1]


def test_ramp_is_linear_after_switch():
    cfg = RoutingConfig(ramp_steps=10)
    s = ScheduleState(step=15, stage=SPECIALISATION, switch_step=10)
    assert ramp(s, cfg) == pytest.approx(0.5)
    assert ramp(ScheduleState(step=40, stage=SPECIALISATION, switch_step=10), cfg) == 1.0
    assert ramp(ScheduleState(step=5), cfg) == 0.0
