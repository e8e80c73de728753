"""The device rule of the distributed trainer (magnet_dist/parallel/device.py), on CPU.

NCCL only moves CUDA tensors and gloo only CPU ones: the collective helpers must create their
tensors on the device of the group's backend. No GPU here: the NCCL choice is checked as a
choice (the backend name), the gloo path runs for real in a one-process group.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist

from magnet_dist.errors import MagnetError
from magnet_dist.model.schedule import ScheduleState
from magnet_dist.parallel import device as device_mod
from magnet_dist.parallel.device import (
    collective_device,
    collective_tensor,
    device_for_backend,
    worker_device,
)


@pytest.fixture
def gloo_world():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        # torch 2.2's destroy_process_group deadlocks if gloo's worker thread still has the last
        # collective's tensors to free (it needs the GIL the destructor holds;
        # pytorch/pytorch#154976): a sleep releases the GIL and lets it finish first
        time.sleep(0.5)
        dist.destroy_process_group()


def test_cpu_worker_computes_on_cpu():
    assert worker_device(False) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_worker_without_cuda_is_refused_with_a_clear_error():
    with pytest.raises(MagnetError, match="use_gpu=true but this worker sees no CUDA device"):
        worker_device(True)


def test_collectives_use_cuda_tensors_on_nccl_and_cpu_tensors_on_gloo():
    assert device_for_backend("nccl") == torch.device("cuda")
    assert device_for_backend("NCCL").type == "cuda"
    assert device_for_backend("gloo") == torch.device("cpu")
    assert device_for_backend("mpi") == torch.device("cpu")


def test_without_a_process_group_collectives_stay_on_cpu():
    assert not dist.is_initialized()
    assert collective_device() == torch.device("cpu")


def test_collective_device_follows_the_group_backend(gloo_world, monkeypatch):
    assert collective_device() == torch.device("cpu")
    t = collective_tensor([1.0, 2.0])
    assert t.device.type == "cpu" and t.dtype == torch.float64
    # the same group, were it NCCL: its tensors must be CUDA tensors
    monkeypatch.setattr(device_mod.dist, "get_backend", lambda group=None: "nccl")
    assert collective_device() == torch.device("cuda")


def test_worker_collective_helpers_run_on_the_group_device(gloo_world, monkeypatch):
    from magnet_dist.train import step

    assert step.sync_step([1.0, 3.0], ScheduleState()) == [1.0, 3.0]
    seen = []
    real = device_mod.collective_device

    def spy(group=None):
        seen.append(real(group))
        return seen[-1]

    monkeypatch.setattr(device_mod, "collective_device", spy)
    step.sync_step([2.0], ScheduleState())
    assert seen == [torch.device("cpu")], "helpers must ask the group for their device"
