"""Data-parallel helpers for ``torchrun --nproc_per_node=N -m sta train ...``.

The process group is created from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...):
gloo on the CPU, nccl when every rank has a GPU. Gradients are averaged with one flat
all-reduce per step (not DDP: with hard spikes a field may get no gradient on one rank, which DDP
would need ``find_unused_parameters`` for). Rank 0 writes every file.
"""
from __future__ import annotations

import os
from typing import Iterable, NamedTuple

import torch
import torch.distributed as dist

__all__ = ["Context", "setup", "teardown", "average_gradients", "broadcast_parameters", "gather_objects"]


class Context(NamedTuple):
    """rank, world size, and the device this rank computes on."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Context:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1), else a 1-process context.

    device: "auto" (a GPU per rank when available, else CPU), "cpu" or "cuda".
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Context(rank, world, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: Iterable[torch.nn.Parameter], world: int) -> None:
    """Average ``.grad`` over ranks in place (one flat all-reduce; a missing grad counts as 0)."""
    if world <= 1:
        return
    params = [p for p in params if p.requires_grad and p.numel()]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_parameters(module: torch.nn.Module, world: int) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if world <= 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, 0)


def gather_objects(obj, world: int) -> list:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if world <= 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
