"""torch.distributed for stage one: `torchrun --nproc-per-node N tools/lower.py ...` runs N ranks
that split every step's windows and sum their gradients.

The pipeline computes on the CPU, so the process group is gloo (NCCL needs the tensors on a GPU,
which no pass puts them on). Each rank gets `cores / ranks` threads, so N ranks do not oversubscribe
the machine.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment); returns
    (rank, world size), (0, 1) when not launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(tensors: list[torch.Tensor], op: dist.ReduceOp | None = None) -> None:
    """Sum (or `op`) each tensor across ranks in place, as one flat float64 buffer; a no-op
    without a process group."""
    if rank_and_world()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    dist.all_reduce(flat, op=op or dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].reshape(t.shape).to(t.dtype))
        offset += t.numel()
