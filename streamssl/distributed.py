"""torch.distributed for every stage that needs it: which rank this process is, the process group, and the
few collectives the methods and the daemon use. No protocol of our own: torchrun starts the processes and
sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous); NCCL on GPUs, gloo on CPUs.

Every helper is the identity (or a no-op) in a single process with no process group, so code that calls
them runs unchanged with one process: ``gather(x)`` is ``x`` there.

``gather_with_grad`` and ``sum_with_grad`` are written here rather than taken from
``torch.distributed.nn.functional`` (deprecated in torch 2.10; its gather's backward needs all-to-all, which
gloo lacks on CPUs): the gather's gradient is summed with one all-reduce (more traffic than a reduce-scatter,
for embeddings of a few hundred KiB a step: nothing next to DDP's).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    """This process's place among the job's: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, the store, history and progress lines."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} (local {self.local_rank})" if self.distributed else "one process"


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The ``World`` torchrun describes in the environment (one process when it does not)."""
    env = dict(os.environ) if env is None else env
    try:
        world = World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {exc}") from None
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise ValueError(f"rank {world.rank} is out of range for WORLD_SIZE {world.size}")
    return world


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(world: World, device: torch.device, *, backend: str = "auto", timeout_s: float = 600.0) -> None:
    """Join the job's process group (the ``env://`` rendezvous torchrun sets up); nothing for one process.

    ``timeout_s`` bounds every collective: a rank that stops answering fails the others after it, with
    torch's error naming the collective, instead of hanging them.
    """
    if not world.distributed or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device  # binds the communicator to this rank's GPU at once
    dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensor: Tensor, op: str = "sum") -> Tensor:
    """All-reduce in place with "sum", "max" or "min"; returns ``tensor``."""
    if initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                    "min": dist.ReduceOp.MIN}[op])
    return tensor


def reduce_for_sinkhorn(tensor: Tensor, op: str) -> None:
    """SwAV's ``Reduce`` (learner/methods/sinkhorn.py) over the job's process group."""
    all_reduce_(tensor, op)


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """Every rank's ``x`` (same shape on every rank) concatenated along dim 0, in rank order; no gradient."""
    if not initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rows = x.shape[0]
        return gather(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on our rows: their gradients add up
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """``gather`` through which gradients flow back to each rank's own rows (SimCLR's negatives from every
    rank). With DDP averaging parameter gradients over ranks, the result is the gradient of the mean of the
    ranks' losses: the single-process gradient of the concatenated batch."""
    return _GatherWithGrad.apply(x) if initialized() else x


class _SumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)  # every rank's loss depends on the sum
        return grad


def sum_with_grad(x: Tensor) -> Tensor:
    """The sum of every rank's ``x``, through which gradients flow back to each rank (job-wide batch norm)."""
    return _SumWithGrad.apply(x) if initialized() else x


def rank_offset(rows: int) -> int:
    """Where this rank's ``rows`` rows start in a ``gather`` of equal parts."""
    return dist.get_rank() * rows if initialized() else 0


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable, CPU tensors) at rank 0, in rank order; None on the other ranks."""
    if not initialized():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (what the others pass is ignored)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it moved to the CPU (before it is pickled to another rank)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


__all__ = ["World", "all_reduce_", "broadcast_object", "gather", "gather_objects", "gather_with_grad", "init",
           "initialized", "rank_offset", "reduce_for_sinkhorn", "shutdown", "sum_with_grad", "to_cpu", "world_from_env"]
