"""Pick the MoE head for a worker: dense ``TripletMoE`` (ep_size 1) or ``ExpertParallelMoE``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from magnet_dist.config import Config, check_expert_count
from magnet_dist.model.experts import build_templates
from magnet_dist.model.magnet import build_dense_moe, build_expert_pool, router_blocks
from magnet_dist.parallel.groups import validate_ep_size


def build_moe(
    cfg: Config,
    modalities: list[str],
    rank: int | None = None,
    world: int | None = None,
    seed: int | None = None,
    dispatch: str = "index",
) -> nn.Module:
    """The MoE head for ``MagnetModel(cfg, dims, moe=...)``.

    ``cfg.moe.ep_size == 1``: the dense ``TripletMoE`` (replicated, data-parallel). Otherwise
    ``ExpertParallelMoE``: collective, every rank must call it (creates DeepSpeed's groups on
    first use; torch.distributed must be initialised). ``rank``/``world`` are checked against
    torch.distributed when given. With ``seed``, weights are drawn under that seed in the same
    order as ``build_dense_moe``, so every rank holds its slice of one global pool, equal to
    the dense model built under the same seed.
    """
    m, moe = cfg.model, cfg.moe
    check_expert_count(cfg, len(modalities))  # E depends on the dataset's modalities
    if moe.ep_size > 1:
        num_experts = (
            len(build_templates(modalities, list(moe.families))) * moe.experts_per_template
        )
        if world is None:
            world = dist.get_world_size() if dist.is_initialized() else 1
        validate_ep_size(moe.ep_size, num_experts, world)
        if not dist.is_initialized():
            raise RuntimeError(
                f"moe.ep_size={moe.ep_size} needs torch.distributed initialised before build_moe"
            )
        if world != dist.get_world_size() or (rank is not None and rank != dist.get_rank()):
            raise ValueError(
                f"build_moe(rank={rank}, world={world}) does not match torch.distributed "
                f"(rank {dist.get_rank()}, world {dist.get_world_size()})"
            )
        from magnet_dist.parallel.groups import setup_expert_parallel

        groups = setup_expert_parallel(moe.ep_size, num_experts)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if moe.ep_size == 1:
            return build_dense_moe(cfg, modalities)
        from magnet_dist.parallel.expert_parallel import ExpertParallelMoE

        experts = build_expert_pool(cfg, modalities)
        return ExpertParallelMoE(
            experts,
            len(modalities) * m.dim,
            moe.top_k,
            groups,
            capacity_factor=moe.capacity_factor,
            router_noise=moe.router_noise,
            dispatch=dispatch,
            router_blocks=router_blocks(cfg, modalities),
        )
