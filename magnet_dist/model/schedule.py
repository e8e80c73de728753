"""(B) Entropy-triggered two-stage routing: coverage first, then specialisation.

The trigger is a pure function of globally reduced numbers (``advance``), so every worker that
sees the same signal sequence switches on the same step. The signal is ``trigger_signal``:
H_load, the entropy of the actual Top-K assignments (``routing.trigger_on=hard``, default), or
the soft H_use (``soft``); docs/routing.md says why. Its state is a small dataclass that goes
into checkpoints as a dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from magnet_dist.config import RoutingConfig
from magnet_dist.model.router import RoutingStats

COVERAGE = "coverage"
SPECIALISATION = "specialisation"


@dataclass(frozen=True)
class ScheduleState:
    step: int = 0  # steps observed so far
    stage: str = COVERAGE
    ema: float | None = None  # EMA of the trigger signal (H_load or H_use)
    above: int = 0  # consecutive steps with ema >= tau
    switch_step: int | None = None
    forced: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScheduleState:
        return cls(**d)


def trigger_signal(stats: RoutingStats, cfg: RoutingConfig) -> float:
    """The number the trigger watches for one step's global stats: H_load (hard) or H_use."""
    return float(stats.h_load() if cfg.trigger_on == "hard" else stats.h_use())


def advance(state: ScheduleState, signal: float, cfg: RoutingConfig) -> ScheduleState:
    """State after observing one step's global trigger signal (``trigger_signal``). Never
    switches before ``cfg.min_steps`` observed steps; forced once ``cfg.max_steps`` steps are
    observed; never with two_stage off."""
    ema = signal if state.ema is None else cfg.ema_decay * state.ema + (1 - cfg.ema_decay) * signal
    step = state.step + 1
    above = state.above + 1 if ema >= cfg.tau else 0
    new = replace(state, step=step, ema=ema, above=above)
    if state.stage != COVERAGE or not cfg.two_stage:
        return new
    if step >= cfg.min_steps and above >= cfg.window:
        return replace(new, stage=SPECIALISATION, switch_step=step)
    if step >= cfg.max_steps:
        return replace(new, stage=SPECIALISATION, switch_step=step, forced=True)
    return new


def ramp(state: ScheduleState, cfg: RoutingConfig) -> float:
    """r(t): 0 -> 1 linearly over ``ramp_steps`` after the switch."""
    if state.stage != SPECIALISATION:
        return 0.0
    if cfg.ramp_steps == 0:
        return 1.0
    return min(1.0, (state.step - state.switch_step) / cfg.ramp_steps)


def routing_loss(stats: RoutingStats, state: ScheduleState, cfg: RoutingConfig) -> torch.Tensor:
    """Coverage: bal*l_aux + cov*(1-H_use). Specialisation: bal*l_aux + r*spec*H_conf +
    cov_guard*(1-H_use)."""
    l_aux = stats.l_aux()
    h_use = stats.h_use()
    if state.stage == COVERAGE:
        return cfg.lambda_bal * l_aux + cfg.lambda_cov * (1 - h_use)
    return (
        cfg.lambda_bal * l_aux
        + ramp(state, cfg) * cfg.lambda_spec * stats.h_conf()
        + cfg.lambda_cov_guard * (1 - h_use)
    )
