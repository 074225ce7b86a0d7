"""Running the training loop under ``torchrun``: the process group, gradient and metric averaging.

A caller changes nothing to train on several processes: ``torchrun --nproc_per_node 2 script.py``
sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``, and ``process_group()`` joins the group (gloo on
CPU, nccl when the model sits on a GPU) the first time the loop runs. Outside ``torchrun`` it is
one process and every helper here is a no-op.

>>> process_group(torch.device("cpu"))
(0, 1)
>>> mean_over_ranks(3.0)
3.0
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["process_group", "mean_over_ranks", "average_gradients", "broadcast_parameters", "gather_objects",
           "barrier", "is_main"]

log = logging.getLogger(__name__)


def process_group(device: torch.device) -> tuple[int, int]:
    """``(rank, world_size)``; joins the process group ``torchrun`` described if none is joined yet."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this PyTorch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} are not set; launch with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    atexit.register(_leave)
    log.info("joined a %s process group as rank %d of %d", backend, dist.get_rank(), world)
    return dist.get_rank(), dist.get_world_size()


def _leave() -> None:
    if dist.is_initialized():
        try:
            dist.barrier()  # a rank that tears its group down while a peer still talks to it aborts the peer
        finally:
            dist.destroy_process_group()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0 (or without a process group): the process that logs and writes files."""
    return not _distributed() or dist.get_rank() == 0


def mean_over_ranks(value: float) -> float:
    """The mean of a number over all processes (an epoch's loss, a metric)."""
    if not _distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of parameters that DistributedDataParallel does not manage (adapters of
    a feature loss, say), in one flat all-reduce; a missing gradient counts as zero on that rank."""
    if not _distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_parameters(params: Iterable[torch.Tensor]) -> None:
    """Give every rank rank 0's values (DDP does this for the model; this is for the rest)."""
    if not _distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (one element without a process group)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _distributed():
        dist.barrier()
