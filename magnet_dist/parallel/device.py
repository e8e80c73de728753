"""Which device a worker computes on, and which device a collective's tensors must be on.

One rule for the whole trainer: the model, the sampled blocks, their features and the ID
embedding rows of a step live on :func:`worker_device` (the worker's GPU with
``train.use_gpu``, else the CPU); DGL's RPC (sampling, KV-store pulls and pushes) stays on the
CPU. A collective runs on :func:`collective_device` of its process group: NCCL only moves CUDA
tensors, gloo only CPU ones, so a small tensor made for a collective (a loss to average, a
schedule check, ranking sums) is created there and read back with ``.cpu()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def worker_device(use_gpu: bool) -> torch.device:
    """This Ray Train worker's device: the GPU Ray assigned to it (``ray.train.torch``'s
    ``get_device``, which also honours several GPUs per worker) with ``use_gpu``, else cpu."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from magnet_dist.errors import MagnetError

        raise MagnetError(
            "train.use_gpu=true but this worker sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={_visible()!r}); give the worker pods a GPU "
            "(nvidia.com/gpu: 1) or set train.use_gpu=false"
        )
    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    return device


def device_for_backend(backend: str) -> torch.device:
    """The device tensors of a collective on ``backend`` must be on: the current CUDA device
    for NCCL (Ray Train sets it per worker), the CPU for gloo / MPI."""
    return torch.device("cuda") if str(backend).lower() == "nccl" else torch.device("cpu")


def collective_device(group=None) -> torch.device:
    """:func:`device_for_backend` of ``group`` (default: the world); cpu without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    return device_for_backend(dist.get_backend(group))


def collective_tensor(values, dtype: torch.dtype = torch.float64, group=None) -> torch.Tensor:
    """``torch.tensor(values)`` on the device a collective of ``group`` needs."""
    return torch.tensor(values, dtype=dtype, device=collective_device(group))


def _visible() -> str | None:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")
