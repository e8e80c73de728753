"""All-reduce helpers for the data-parallel / expert-parallel split of parameters.

Dense parameters (projections, fusion scalars, router, read-out) are replicated on every worker:
their gradients are averaged over the world. Expert parameters (DeepSpeed's marking
``param.allreduce = False``, ``param.group_name = "ep_size_P"``) live on one rank per
expert-parallel group: after the all-to-all backward their gradient already sums the
contributions of every rank in that group, so they are summed only over the replicas of the same
experts (the expert-data-parallel group) and divided by the world size, as DeepSpeed's engine
does, so the result is the same as dense data parallelism with the same global batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from magnet_dist.parallel.groups import expert_data_parallel_group


def is_expert_param(param: torch.Tensor) -> bool:
    return getattr(param, "allreduce", True) is False


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) parameters: give each its own optimizer, so the dense optimizer's
    state is identical on every rank (saved once) and the expert optimizer's state goes into
    the expert shards (``save_expert_shard(moe, dir, optimizer=expert_optimizer)``)."""
    dense, experts = [], []
    for param in model.parameters():
        (experts if is_expert_param(param) else dense).append(param)
    return dense, experts


def expert_state_prefixes(model: nn.Module) -> list[str]:
    """State-dict key prefixes of expert-parallel expert containers inside ``model``."""
    from magnet_dist.parallel.expert_parallel import TemplateExperts

    return [
        f"{name}." if name else ""
        for name, module in model.named_modules()
        if isinstance(module, TemplateExperts)
    ]


def _all_reduce_flat(tensors: list[torch.Tensor], group, scale: float, reduce: bool) -> None:
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    if reduce:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
        t.copy_(synced)


@torch.no_grad()
def allreduce_gradients(model: nn.Module) -> None:
    """Average dense gradients over the world; sum expert gradients over their expert-data-
    parallel group and divide by the world size. Call after ``backward()`` on every rank.

    A parameter without a gradient on this rank gets a zero gradient first, so every rank
    reduces the same buffers in the same order.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    dense: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    experts: dict[tuple[str, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        if is_expert_param(param):
            experts[(param.group_name, param.grad.dtype)].append(param.grad)
        else:
            dense[param.grad.dtype].append(param.grad)
    for dtype in sorted(dense, key=str):
        _all_reduce_flat(dense[dtype], None, 1.0 / world, reduce=True)
    for name, dtype in sorted(experts, key=str):
        group = expert_data_parallel_group(name)
        replicas = dist.get_world_size(group=group)
        _all_reduce_flat(experts[(name, dtype)], group, 1.0 / world, reduce=replicas > 1)


def stats_all_reduce(group=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Autograd-aware all-reduce SUM for ``RoutingStats.reduce`` (default: the whole world).

    Backward all-reduces the gradients too: every rank computes the same routing loss from the
    same global sums, so each rank's probs receive W x d(loss)/d(probs); the world average in
    ``allreduce_gradients`` then gives exactly the single-process gradient of that loss.
    """
    from torch.distributed.nn.functional import all_reduce

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized() or dist.get_world_size(group=group) == 1:
            return t
        return all_reduce(t, op=dist.ReduceOp.SUM, group=group or dist.group.WORLD)

    return reduce


@torch.no_grad()
def broadcast_parameters(model: nn.Module, buffers: bool = True) -> None:
    """Make replicas identical at start-up: dense params (and buffers) from world rank 0,
    expert params from the first rank of their expert-data-parallel group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    prefixes = tuple(expert_state_prefixes(model))
    dense: list[torch.Tensor] = []
    experts: dict[str, list[torch.Tensor]] = defaultdict(list)
    for param in model.parameters():
        if is_expert_param(param):
            experts[param.group_name].append(param.data)
        else:
            dense.append(param.data)
    if buffers:
        dense += [
            b for name, b in model.named_buffers() if not (prefixes and name.startswith(prefixes))
        ]
    _broadcast_flat(dense, None, 0)
    for name in sorted(experts):
        group = expert_data_parallel_group(name)
        if dist.get_world_size(group=group) > 1:
            _broadcast_flat(experts[name], group, dist.get_global_rank(group, 0))


def _broadcast_flat(tensors: Iterable[torch.Tensor], group, src: int) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        by_dtype[t.dtype].append(t)
    for dtype in sorted(by_dtype, key=str):
        ts = by_dtype[dtype]
        flat = _flatten_dense_tensors(ts)
        dist.broadcast(flat, src=src, group=group)
        for t, synced in zip(ts, _unflatten_dense_tensors(flat, ts), strict=True):
            t.copy_(synced)
