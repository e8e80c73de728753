"""What a distributed worker holds while it trains: its resources (:class:`WorkerRun`) and
its loop state (:class:`Progress`, the one writer and reader of the resume dict)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from magnet_dist.config import Config
from magnet_dist.model.magnet import MagnetModel
from magnet_dist.model.schedule import ScheduleState
from magnet_dist.train.batches import NegativeSampler
from magnet_dist.train.cluster import WorkerContext
from magnet_dist.train.common import EarlyStopping
from magnet_dist.train.faults import FaultHooks
from magnet_dist.train.run_folder import StepLog
from magnet_dist.train.step_clock import StepClock


@dataclass
class Optimizers:
    """Every optimizer of a worker: Adam over the dense parameters, Adam over this rank's
    experts (with expert parallelism and MoE), DGL's sparse Adam over the embedding rows this
    worker touched. The step calls ``step_dense`` and ``sparse.step()`` apart, so the step
    clock times them apart."""

    dense: torch.optim.Optimizer
    expert: torch.optim.Optimizer | None
    sparse: Any

    def zero_grad(self) -> None:
        # the sparse optimizer keeps no gradient buffer of its own
        for opt in (self.dense, self.expert):
            if opt is not None:
                opt.zero_grad(set_to_none=True)

    def step_dense(self) -> None:
        for opt in (self.dense, self.expert):
            if opt is not None:
                opt.step()


@dataclass
class WorkerRun:
    """A worker's resources for the whole run (built once by ``build_worker_run``)."""

    cfg: Config
    ctx: WorkerContext
    run_dir: Path
    device: torch.device
    client: Any
    servers: Any  # this worker's ServerGroup, or None
    model: MagnetModel
    optim: Optimizers
    sampler: NegativeSampler
    users_local: torch.Tensor  # this worker's training edges
    items_local: torch.Tensor
    max_local: int  # the most local edges of any rank (every rank takes that many steps)
    evaluators: dict
    log: StepLog
    faults: FaultHooks
    show_progress: bool
    history: Any = None  # train.history: the History table and the FullGraph it is made from
    full_graph: Any = None

    @property
    def history_seconds(self) -> float:
        """Seconds spent refreshing the history table in this attempt (0 without history)."""
        return self.history.seconds if self.history is not None else 0.0


@dataclass
class Progress:
    """The loop state of a worker: where it is, and what it decided so far.

    ``epoch``: the epoch being (or next to be) trained; ``batch``: the next batch of its plan,
    ``None`` once the epoch is complete (evaluation included). ``state_dict`` is the resume
    dict of every checkpoint; ``pairs``, ``step_seconds``, ``clock``, ``routing`` and the
    clocks are this attempt's only."""

    stopper: EarlyStopping
    epoch: int = 0
    batch: int | None = 0
    step: int = 0
    schedule: ScheduleState = field(default_factory=ScheduleState)
    best_metrics: dict[str, float] = field(default_factory=dict)
    pairs: int = 0
    step_seconds: float = 0.0  # training steps only (a history refresh is not in it)
    clock: StepClock = field(default_factory=StepClock)  # step_seconds, part by part
    routing: Any = None  # routing of the last completed epoch (rank 0)
    t0: float = 0.0  # time.time() when training started (train_seconds)
    checkpointed_at: float = 0.0  # time.monotonic() of the last checkpoint

    @property
    def should_stop(self) -> bool:
        return self.stopper.should_stop

    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.to_dict(),
            "early_stopping": self.stopper.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,  # None: written after the epoch's evaluation
            "best_metrics": self.best_metrics,
        }

    def load_state_dict(self, ck: dict[str, Any], epochs: int) -> None:
        self.schedule = ScheduleState.from_dict(ck["schedule"])
        self.stopper.load_state_dict(ck["early_stopping"])
        self.step, self.best_metrics = ck["step"], ck["best_metrics"]
        if ck.get("batch") is None:  # written after the epoch's evaluation
            self.epoch, self.batch = ck["epoch"] + 1, 0
        else:  # written inside the epoch: the epoch goes on at that batch
            self.epoch, self.batch = ck["epoch"], int(ck["batch"])
        if self.stopper.should_stop:
            self.epoch = epochs
