"""(IV) The triplet MoE head, expert-parallel: DeepSpeed's MoE machinery with MAGNET's gate.

Same call as the dense reference ``TripletMoE``: ``moe(tokens [N, M*d], explore) ->
(mixture [N, d], RoutingStats)``, so ``MagnetModel(cfg, dims, moe=ExpertParallelMoE(...))``
works unchanged. What comes from DeepSpeed: ``MOELayer`` (the GShard dispatch -> all-to-all ->
experts -> all-to-all -> combine layer; subclassed because MAGNET's experts map M*d -> d, while
DeepSpeed's forward requires output dim == input dim), its ``_AllToAll`` autograd function, its
``Experts`` container (params marked ``allreduce=False`` / ``group_name``) and its
expert-parallel process groups. What is MAGNET's: the gate (``MagnetGate``: softmax Top-K over
the template pool via ``top_k_route``, GShard queue order, capacity on local tokens) and the
experts (``TemplateExpert``, each keeping its template wherever it lives).

Rank with expert-parallel rank r holds global experts ``[r*E/P, (r+1)*E/P)``. Dispatch buffers
are ``[E, C, M*d]`` with C the same on every rank of the expert-parallel group (all-reduce MAX),
so the all-to-all has one shape: without a capacity factor C is the global max expert load (no
token dropped); with one, drops use each rank's own capacity ``ceil(f * N_local * K / E)`` and C
is only the buffer size. A dropped assignment contributes 0 to the mixture row, so the score
falls back to the residual dot product for it; drops are counted in ``RoutingStats``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn

from magnet_dist.model.experts import Template, TemplateExpert
from magnet_dist.model.router import (
    Routing,
    RoutingStats,
    TopKRouter,
    capacity_for,
    queue_positions,
    routing_stats,
)
from magnet_dist.parallel.groups import ExpertParallelGroups, prepare_deepspeed_import

try:  # DeepSpeed is imported lazily by groups.py (its environment set first); the classes
    # below subclass DeepSpeed's, so importing this module imports DeepSpeed.
    prepare_deepspeed_import()
    import deepspeed.comm as ds_dist
    from deepspeed.moe.experts import Experts
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import MOELayer, _AllToAll, einsum
except ImportError as err:  # pragma: no cover - deepspeed is a hard dependency
    raise ImportError("expert parallelism needs deepspeed (pip install -e .)") from err

DISPATCH_MODES = ("index", "dense")


class FlatExpert(nn.Module):
    """Adapter between DeepSpeed's ``Experts`` (inputs ``[ep, 1, C, M*d]``) and a
    ``TemplateExpert`` (inputs ``[n, M*d]``): flattens the leading dims and restores them."""

    def __init__(self, expert: TemplateExpert) -> None:
        super().__init__()
        self.expert = expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.expert(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)


class TemplateExperts(Experts):
    """DeepSpeed's ``Experts`` container holding this rank's (different) template experts.

    DeepSpeed's constructor deep-copies one expert; MAGNET's local experts differ in template,
    so the list is replaced and DeepSpeed's marking (``allreduce=False``, ``group_name``) is
    reapplied: these params are reduced only over the expert-data-parallel group.
    """

    def __init__(self, experts: list[TemplateExpert], expert_group_name: str) -> None:
        super().__init__(nn.Identity(), len(experts), expert_group_name)
        self.deepspeed_experts = nn.ModuleList(FlatExpert(e) for e in experts)
        for wrapped in self.deepspeed_experts:
            for param in wrapped.parameters():
                param.allreduce = False
                param.group_name = expert_group_name


class MagnetGate(nn.Module):
    """A gate for DeepSpeed's MOELayer built on MAGNET's router (``TopKRouter``).

    Returns DeepSpeed's gate tuple ``(l_aux, combine_weights, dispatch_mask, exp_counts)``.
    ``dense=True``: GShard's ``[S, E, C]`` tensors (what stock MOELayer einsums). Otherwise the
    compact form of the same information, indexed by (token, choice): ``combine_weights [S, K]``
    (renormalised Top-K probs, 0 where dropped) and ``dispatch_mask [S, K]`` long, the flat slot
    ``expert * C + queue position`` (-1 where dropped). The router itself is the owning
    module's (so its parameter name matches the dense ``TripletMoE``); the last ``Routing`` and
    the buffer capacity C are kept for the layer and the routing statistics.
    """

    def __init__(
        self,
        router: TopKRouter,
        num_experts: int,
        capacity_factor: float | None,
        dense: bool = False,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_router", router)  # not a submodule: owned by the MoE module
        self.num_experts = num_experts
        self.k = router.top_k
        self.capacity_factor = capacity_factor
        self.dense = dense
        self.ep_group = None
        self.explore = False
        self.last_routing: Routing | None = None
        self.last_stats: RoutingStats | None = None
        self.last_capacity = 0

    def _set_ep_group(self, ep_group) -> None:
        assert self.ep_group is None, "Attempting to override an existing ep_group"
        self.ep_group = ep_group

    def forward(self, tokens: torch.Tensor, used_token: torch.Tensor | None = None):
        n, e = tokens.shape[0], self.num_experts
        factor = self.capacity_factor if self.training else None  # eval never drops a token
        drop_capacity = capacity_for(n, e, self.k, factor)
        routing = self._router(tokens, drop_capacity, self.explore)
        positions = queue_positions(routing.experts, e)
        load = torch.bincount(routing.experts[routing.kept], minlength=e)
        capacity = self._buffer_capacity(load)
        slots = torch.where(routing.kept, routing.experts * capacity + positions, -1)
        combine = routing.combine * routing.kept
        exp_counts = torch.bincount(routing.experts.reshape(-1), minlength=e).detach()
        self.last_stats = routing_stats(routing)
        l_aux = self.last_stats.l_aux()  # local; the schedule uses the all-reduced stats
        self.last_routing, self.last_capacity = routing, capacity
        if not self.dense:
            return l_aux, combine, slots, exp_counts
        tok, choice = routing.kept.nonzero(as_tuple=True)
        flat = slots[tok, choice]
        combine_sec = tokens.new_zeros(n, e * capacity).index_put((tok, flat), combine[tok, choice])
        dispatch_sec = torch.zeros(n, e * capacity, dtype=torch.bool, device=tokens.device)
        dispatch_sec[tok, flat] = True
        return (
            l_aux,
            combine_sec.view(n, e, capacity),
            dispatch_sec.view(n, e, capacity),
            exp_counts,
        )

    def _buffer_capacity(self, load: torch.Tensor) -> int:
        """Slots per expert in the dispatch buffer: the largest kept load over the expert-
        parallel group (all ranks need one all-to-all shape), at least 1."""
        need = load.max().reshape(1) if load.numel() else load.new_zeros(1)
        if self.ep_group is not None and ds_dist.get_world_size(group=self.ep_group) > 1:
            ds_dist.all_reduce(need, op=ds_dist.ReduceOp.MAX, group=self.ep_group)
        return max(int(need.item()), 1)


class TemplateMOELayer(MOELayer):
    """DeepSpeed's MOELayer with an output width of its own (experts map M*d -> d).

    The forward is stock GShard Algorithm 2 as in ``MOELayer.forward`` (gate, dispatch,
    ``_AllToAll``, ``[ep, L, C, m]`` through ``Experts``, ``_AllToAll``, combine), without the
    tensor-parallel branches (MAGNET does not use tensor parallelism). ``dispatch="dense"`` uses
    DeepSpeed's einsums on ``[S, E, C]`` masks; ``"index"`` (default) does the same gather /
    scatter with index ops, O(S*K) instead of O(S*E*C) (GShard's einsum dominates on CPU).
    ``profile=True`` times the two all-to-alls (forward and backward) into ``timings``.
    """

    def __init__(
        self,
        gate: MagnetGate,
        experts: TemplateExperts,
        ep_group_name: str,
        ep_size: int,
        num_local_experts: int,
    ) -> None:
        super().__init__(gate, experts, ep_group_name, ep_size, num_local_experts)
        self.profile = False
        self.timings: dict[str, float] = {}

    def forward(self, *input: torch.Tensor, **kwargs) -> torch.Tensor:
        x = input[0].reshape(-1, input[0].shape[-1])
        used_token = input[1] if len(input) > 1 else None
        self.l_aux, combine, dispatch, self.exp_counts = self.gate(x, used_token)
        num_experts, capacity = self.ep_size * self.num_local_experts, self.gate.last_capacity
        if self.gate.dense:
            dispatched = einsum("sec,sm->ecm", dispatch.type_as(x), x)
        else:
            tok, choice = (dispatch >= 0).nonzero(as_tuple=True)
            flat = dispatch[tok, choice]
            dispatched = (
                x.new_zeros(num_experts * capacity, x.shape[1])
                .index_copy(0, flat, x[tok])
                .view(num_experts, capacity, x.shape[1])
            )
        dispatched = self._all_to_all(dispatched, "dispatch")
        dispatched = dispatched.reshape(self.ep_size, self.num_local_experts, capacity, -1)
        expert_output = self.experts(dispatched)  # [ep, L, C, d]
        expert_output = expert_output.reshape(num_experts, capacity, expert_output.shape[-1])
        expert_output = self._all_to_all(expert_output, "combine")
        if self.gate.dense:
            return einsum("sec,ecm->sm", combine.type_as(x), expert_output)
        picked = expert_output.reshape(num_experts * capacity, -1)[flat]
        picked = picked * combine[tok, choice].unsqueeze(1)
        return x.new_zeros(x.shape[0], picked.shape[1]).index_add(0, tok, picked)

    def _all_to_all(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if not self.profile:
            return _AllToAll.apply(self.ep_group, t)
        start = _now(t)
        out = _AllToAll.apply(self.ep_group, t)
        self._add(f"a2a_{what}_fwd", _now(t) - start)
        if t.requires_grad:  # backward: grad of the output arrives -> a2a -> grad of the input
            mark: list[float] = []
            out.register_hook(lambda g: mark.append(_now(g)))
            t.register_hook(lambda g: self._add(f"a2a_{what}_bwd", _now(g) - mark.pop()))
        return out

    def _add(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds


def _now(t: torch.Tensor) -> float:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()


class ExpertParallelMoE(MoE):
    """The triplet MoE head with experts split over the expert-parallel group.

    ``experts`` is the *global* pool (built identically on every rank, e.g. by
    ``build_experts``); this rank keeps experts ``groups.local_experts`` and drops the rest.
    The router is data-parallel (same on every rank; gradients all-reduced over the world).

    A ``deepspeed.moe.layer.MoE`` (same attributes: ``deepspeed_moe``, ``expert_group_name``,
    ``ep_size``, ``num_experts``, ``num_local_experts``) so DeepSpeed tooling that looks for MoE
    layers finds it, but built here (``MoE.__init__`` would create DeepSpeed's own gate and
    copies of one expert) and with MAGNET's forward signature.
    """

    def __init__(
        self,
        experts: list[TemplateExpert],
        token_dim: int,
        top_k: int,
        groups: ExpertParallelGroups,
        capacity_factor: float | None = None,
        router_noise: float = 0.0,
        dispatch: str = "index",
        router_blocks: int = 0,
    ) -> None:
        nn.Module.__init__(self)  # not MoE.__init__: see the class docstring
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch={dispatch!r}; choose from {DISPATCH_MODES}")
        if len(experts) != groups.num_experts:
            raise ValueError(
                f"got {len(experts)} experts but the expert-parallel groups were set up for "
                f"E={groups.num_experts}"
            )
        self.router = TopKRouter(token_dim, len(experts), top_k, router_noise, router_blocks)
        self.capacity_factor = capacity_factor
        self.dim = experts[0].dim
        self.ep_size = groups.ep_size
        self.ep_rank = groups.ep_rank
        self.expert_group_name = groups.name
        self.num_experts = len(experts)
        self.expert_ids = list(groups.local_experts)
        self.num_local_experts = len(self.expert_ids)
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.templates: list[Template] = [e.template for e in experts]
        self.groups = groups
        gate = MagnetGate(self.router, len(experts), capacity_factor, dense=dispatch == "dense")
        local = TemplateExperts([experts[g] for g in self.expert_ids], groups.name)
        self.deepspeed_moe = TemplateMOELayer(
            gate, local, groups.name, groups.ep_size, len(self.expert_ids)
        )
        self.deepspeed_moe._set_ep_group(groups.ep_group)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by DeepSpeed's engine: the groups already exist (``setup_expert_parallel``)."""
        if use_data_before_expert_parallel_:
            raise ValueError(
                "ExpertParallelMoE uses DeepSpeed's default E+D group layout; "
                "use_data_before_expert_parallel_ is not supported"
            )

    @property
    def gate(self) -> MagnetGate:
        return self.deepspeed_moe.gate

    def local_experts(self) -> Iterator[tuple[int, TemplateExpert]]:
        """(global expert id, expert) for the experts this rank holds."""
        for gid, wrapped in zip(
            self.expert_ids, self.deepspeed_moe.experts.deepspeed_experts, strict=True
        ):
            yield gid, wrapped.expert

    def forward(
        self, tokens: torch.Tensor, explore: bool = False
    ) -> tuple[torch.Tensor, RoutingStats]:
        self.gate.explore = explore
        mixture = self.deepspeed_moe(tokens, None)
        return mixture, self.gate.last_stats


def copy_from_dense(ep_moe: ExpertParallelMoE, dense) -> None:
    """Load a dense ``TripletMoE``'s router and this rank's experts into ``ep_moe`` (tests,
    and starting an expert-parallel run from a single-process model)."""
    if dense.num_experts != ep_moe.num_experts:
        raise ValueError(
            f"dense MoE has E={dense.num_experts} experts, expert-parallel E={ep_moe.num_experts}"
        )
    with torch.no_grad():
        ep_moe.router.load_state_dict(dense.router.state_dict())
        for gid, expert in ep_moe.local_experts():
            expert.load_state_dict(dense.experts[gid].state_dict())
