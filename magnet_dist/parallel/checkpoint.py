"""Expert shards and dense state for checkpoints of expert-parallel (or dense) MoE heads.

Each expert-parallel rank writes only its experts, keyed by *global* expert id, to
``experts-ep{r:03d}-of-{P:03d}.pt`` (one writer per replica group). Loading with the same P reads
the rank's own file; with a different P (including 1 = the dense ``TripletMoE``) it reads every
shard of a complete set and picks its experts (re-sharding). Dense parameters (router, encoder,
read-out, ...) are the same on every rank; ``dense_state_dict`` leaves the experts out so it
has the same keys whatever P is.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from magnet_dist.atomic import atomic_path
from magnet_dist.errors import MagnetError
from magnet_dist.model.moe import TripletMoE
from magnet_dist.parallel.expert_parallel import ExpertParallelMoE
from magnet_dist.parallel.reduce import expert_state_prefixes
from magnet_dist.train.checkpoint import verify_file

FORMAT = "magnet-expert-shard-v1"
_SHARD = re.compile(r"experts-ep(\d+)-of-(\d+)\.pt$")


class CheckpointError(MagnetError):
    """An expert checkpoint is missing, incomplete or does not fit the model."""


def shard_name(ep_rank: int, ep_size: int) -> str:
    return f"experts-ep{ep_rank:03d}-of-{ep_size:03d}.pt"


def _layout(moe: nn.Module) -> tuple[int, int, int, dict[int, nn.Module]]:
    """(ep_size, ep_rank, replica rank, {global id: expert}) for a dense or expert-parallel MoE."""
    if isinstance(moe, ExpertParallelMoE):
        return moe.ep_size, moe.ep_rank, moe.groups.edp_rank, dict(moe.local_experts())
    if isinstance(moe, TripletMoE):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        return 1, 0, rank, dict(enumerate(moe.experts))
    raise TypeError(f"expected TripletMoE or ExpertParallelMoE, got {type(moe).__name__}")


def _template_names(moe: nn.Module) -> list[str]:
    if isinstance(moe, ExpertParallelMoE):
        return [t.name for t in moe.templates]
    return [e.template.name for e in moe.experts]


def expert_shard_state(moe: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """This rank's experts as a plain dict (global ids, layout, template names), with the
    optimizer's per-parameter state of those experts (e.g. Adam moments) when given."""
    ep_size, ep_rank, _, experts = _layout(moe)
    state = {
        "format": FORMAT,
        "ep_size": ep_size,
        "ep_rank": ep_rank,
        "num_experts": len(_template_names(moe)),
        "templates": _template_names(moe),
        "experts": {
            gid: {k: v.detach().cpu() for k, v in e.state_dict().items()}
            for gid, e in experts.items()
        },
    }
    if optimizer is not None:
        state["optimizer"] = {
            gid: {
                name: {
                    k: v.detach().cpu() if torch.is_tensor(v) else v
                    for k, v in optimizer.state[p].items()
                }
                for name, p in e.named_parameters()
                if p in optimizer.state
            }
            for gid, e in experts.items()
        }
    return state


def save_expert_shard(
    moe: nn.Module,
    directory: str | Path,
    optimizer: torch.optim.Optimizer | None = None,
    all_replicas: bool = False,
) -> Path | None:
    """Write this rank's experts (and ``optimizer``'s state for them); only the first replica
    of each shard writes unless ``all_replicas``. Returns the path written, or None."""
    ep_size, ep_rank, replica, _ = _layout(moe)
    if replica != 0 and not all_replicas:
        return None
    path = Path(directory) / shard_name(ep_rank, ep_size)
    with atomic_path(path) as tmp:  # a failed write leaves no .tmp and names the path
        torch.save(expert_shard_state(moe, optimizer), tmp)
    return path


def _read(path: Path) -> dict:
    verify_file(path)  # flipped bits would otherwise load as wrong weights (no CRC check)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupted, or not a tensors-only file
        raise CheckpointError(
            f"expert shard {path} cannot be read ({type(err).__name__}: {err}); the checkpoint "
            "is damaged: delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a magnet_dist expert shard ({FORMAT})")
    return state


def load_expert_shard(
    moe: nn.Module, directory: str | Path, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Restore this rank's experts from ``directory``: its own shard when the checkpoint has
    the same ep_size, else every shard of one complete set (re-sharding). With ``optimizer``,
    also its per-parameter state for these experts (saved with ``save_expert_shard``)."""
    directory = Path(directory)
    ep_size, ep_rank, _, experts = _layout(moe)
    names = _template_names(moe)
    own = directory / shard_name(ep_rank, ep_size)
    if own.is_file():
        shards = [_read(own)]
    else:
        shards = _complete_set(directory, len(names))
    found: dict[int, dict] = {}
    found_opt: dict[int, dict] = {}
    for state in shards:
        if state["num_experts"] != len(names) or state["templates"] != names:
            raise CheckpointError(
                f"expert checkpoint in {directory} has E={state['num_experts']} experts "
                f"({state['templates'][:3]}...), the model has E={len(names)} ({names[:3]}...): "
                "use the same moe.families / moe.experts_per_template as the checkpointed run"
            )
        found.update(state["experts"])
        found_opt.update(state.get("optimizer", {}))
    missing = [gid for gid in experts if gid not in found]
    if missing:
        raise CheckpointError(f"expert checkpoint in {directory} lacks experts {missing}")
    for gid, expert in experts.items():
        expert.load_state_dict(found[gid])
    if optimizer is None:
        return
    if not found_opt:
        raise CheckpointError(f"expert checkpoint in {directory} has no optimizer state")
    for gid, expert in experts.items():
        saved = found_opt.get(gid, {})
        for name, p in expert.named_parameters():
            if name in saved:  # Adam keeps "step" on the CPU; moments follow the parameter
                optimizer.state[p] = {
                    k: v if k == "step" or not torch.is_tensor(v) else v.to(p.device, p.dtype)
                    for k, v in saved[name].items()
                }
            else:
                optimizer.state.pop(p, None)


def _complete_set(directory: Path, num_experts: int) -> list[dict]:
    by_size: dict[int, list[Path]] = {}
    for path in sorted(directory.glob("experts-ep*-of-*.pt")):
        match = _SHARD.search(path.name)
        if match:
            by_size.setdefault(int(match.group(2)), []).append(path)
    for size, paths in sorted(by_size.items()):
        if len(paths) == size:
            return [_read(p) for p in paths]
    have = {size: len(paths) for size, paths in by_size.items()}
    raise CheckpointError(
        f"no complete set of expert shards in {directory} (found shards per ep_size: {have or 'none'}); "
        f"a checkpoint of E={num_experts} experts needs all ep_size files experts-epRRR-of-PPP.pt"
    )


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without expert entries (same keys for any ep_size)."""
    prefixes = tuple(_all_expert_prefixes(model))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def load_dense_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``dense_state_dict`` output; every non-expert key must match."""
    prefixes = tuple(_all_expert_prefixes(model))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(prefixes)]
    if missing or unexpected:
        raise CheckpointError(
            f"dense checkpoint does not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def _all_expert_prefixes(model: nn.Module) -> list[str]:
    dense = [
        f"{name}.experts." if name else "experts."
        for name, module in model.named_modules()
        if isinstance(module, TripletMoE)
    ]
    return dense + expert_state_prefixes(model)
