"""Data-parallel training under torchrun: process group set-up and the few collective steps the loop needs."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def distributed() -> tuple[int, int]:
    """(rank, world size); initializes torch.distributed when run under torchrun (WORLD_SIZE > 1): gloo on CPU,
    nccl on CUDA. Single process: (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("EDGEREC_DDP_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def broadcast_flag(flag: bool, device: str) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. early stopping: clocks differ between ranks, rank 0 decides)."""
    t = torch.tensor([int(flag)], device=device if device.startswith("cuda") else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    dist.barrier()


def shutdown() -> None:
    """Leave the process group (end of a torchrun run)."""
    dist.destroy_process_group()
