"""Process groups for expert parallelism, on top of an existing torch.distributed world.

Ray Train (or a test) creates the world group; ``init_deepspeed_comm`` makes DeepSpeed's comm
layer wrap it, and ``setup_expert_parallel`` creates DeepSpeed's expert-parallel groups (ranks
that exchange tokens by all-to-all, E/ep_size experts each) and expert-data-parallel groups
(ranks holding replicas of the same experts, where expert gradients are reduced).

With world W and ep_size P (DeepSpeed's default "E + D" layout): expert-parallel groups are
consecutive ranks ``[0..P), [P..2P), ...``; expert-data-parallel groups are strided
``{i, i+P, i+2P, ...}``. A rank's expert-parallel rank is ``rank % P`` and it holds global
experts ``[ep_rank*E/P, (ep_rank+1)*E/P)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from magnet_dist.errors import ConfigError


def valid_ep_sizes(num_experts: int, world_size: int) -> list[int]:
    """Every ep_size that divides both the expert count and the world size."""
    return [s for s in range(1, num_experts + 1) if num_experts % s == 0 and world_size % s == 0]


def validate_ep_size(ep_size: int, num_experts: int, world_size: int) -> None:
    """Raise ConfigError naming moe.ep_size and the values that work, unless P | E and P | W."""
    if ep_size < 1 or num_experts % ep_size or world_size % ep_size:
        raise ConfigError(
            f"moe.ep_size={ep_size} must divide both the number of experts E={num_experts} "
            f"and the world size (train.workers) W={world_size}; values that work: "
            f"{valid_ep_sizes(num_experts, world_size)}"
        )


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the groups of one ep_size (also stored on expert params)."""
    return f"ep_size_{ep_size}"


def prepare_deepspeed_import() -> None:
    """Set what DeepSpeed reads when it is imported (an explicit setting is kept):

    - no GPU: DeepSpeed's CPU accelerator (it would otherwise probe for CUDA and fail);
    - ``TORCHINDUCTOR_COMPILE_THREADS=1``: ``import deepspeed`` imports torch's inductor, which
      forks min(32, cores) compile workers at import (``AsyncCompile.warm_pool``). magnet_dist
      never compiles with inductor; those forks were copies of a Ray worker (its memory counted
      again, one per core on a big node) that aborted with stack traces when Ray ended the
      worker (seen in the quick start's output)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def init_deepspeed_comm(backend: str | None = None) -> None:
    """Make DeepSpeed's comm layer reuse the torch.distributed world (created by Ray Train or
    ``dist.init_process_group``); on CPU select DeepSpeed's CPU accelerator and skip its
    shared-memory op (a ~100 s JIT compile that gloo does not need). Idempotent."""
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: create the process group first "
            "(Ray Train's TorchTrainer does; in scripts call dist.init_process_group)"
        )
    prepare_deepspeed_import()
    import deepspeed
    import deepspeed.comm as ds_dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if ds_dist.is_initialized():
        return
    deepspeed.init_distributed(dist_backend=backend or dist.get_backend(), verbose=False)


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's view of the expert-parallel layout for one ep_size."""

    ep_size: int
    name: str  # DeepSpeed group name, e.g. "ep_size_2"
    ep_group: dist.ProcessGroup  # all-to-all among the ranks that split the expert pool
    edp_group: dist.ProcessGroup  # gradient reduction among replicas of the same experts
    ep_rank: int
    edp_rank: int
    edp_size: int
    world_size: int
    num_experts: int

    @property
    def local_experts(self) -> range:
        """Global ids of the experts this rank holds."""
        per_rank = self.num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)


def setup_expert_parallel(ep_size: int, num_experts: int) -> ExpertParallelGroups:
    """Create (once) DeepSpeed's expert-parallel and expert-data-parallel groups for ep_size.

    Collective: every rank of the world must call it, with the same arguments.
    """
    init_deepspeed_comm()
    world = dist.get_world_size()
    validate_ep_size(ep_size, num_experts, world)
    from deepspeed.utils import groups

    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    edp_group = groups._get_expert_data_parallel_group(name)
    return ExpertParallelGroups(
        ep_size=ep_size,
        name=name,
        ep_group=ep_group,
        edp_group=edp_group,
        ep_rank=dist.get_rank(group=ep_group),
        edp_rank=dist.get_rank(group=edp_group),
        edp_size=dist.get_world_size(group=edp_group),
        world_size=world,
        num_experts=num_experts,
    )


def expert_data_parallel_group(name: str) -> dist.ProcessGroup:
    """The replica group of the experts whose params carry ``group_name == name``."""
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_group(name)
