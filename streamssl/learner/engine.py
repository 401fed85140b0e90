"""The learning engine: one optimizer step per batch of views, for any method, no epochs, no dataset length.

The engine owns what every method shares: the optimizer and its step-counted schedule (optim.py), bf16
autocast where the device has it natively, channels_last, the step's timings (one CUDA event per part, two
reads of the device a step), and a guard for a process that must never stop: a step whose loss or gradients
are not finite is skipped and counted, leaving every parameter, buffer, optimizer state and method state
bit-for-bit as it was. The method (learner/methods/) supplies the network, the objective and its hooks.

Several processes (torchrun; streamssl/distributed.py): the method's batch norm made job-wide (sync_bn.py),
gradients averaged by DDP, and the step's numbers (the finite check, the loss, the diagnostics, the images)
all-reduced in one collective before the update is decided, so every rank skips the same steps and sees
the same numbers (the loss and diagnostics are the mean over ranks): the daemon's decisions that follow
from them (collapse, non-finite streaks) are taken identically everywhere, with no further message.

The engine knows nothing of data loading, Redis, metrics or the CLI: it takes tensors and returns numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from streamssl import distributed
from streamssl.config import LearnerConfig, ModelConfig
from streamssl.devices import StepTimer, native_bf16
from streamssl.learner.methods import make_method
from streamssl.learner.methods.base import Method
from streamssl.learner.methods.sinkhorn import Reduce
from streamssl.learner.optim import build_optimizer, lr_at, set_lr
from streamssl.learner.sync_bn import convert_sync_batchnorm

log = logging.getLogger(__name__)

ENGINE_PARTS = ("backward", "optim", "update")  # timed after the method's own parts


@dataclass(frozen=True)
class StepStats:
    """What one call of ``Learner.step`` did. Times in seconds."""

    step: int  # optimizer steps applied so far (after this one)
    n_images: int  # images in the batch (B)
    loss: float  # the method's loss (nan when not finite)
    lr: float
    skipped: bool  # the update was skipped (non-finite loss or gradients)
    diagnostics: dict[str, float] = field(default_factory=dict)  # the method's, by Diagnostic.name
    times: dict[str, float] = field(default_factory=dict)  # the method's parts, then ENGINE_PARTS
    total_s: float = 0.0
    embeddings: Tensor | None = None  # (B, D) of the first view, detached, on the device; None when skipped
    all_images: int = 0  # images of the step on every rank together (n_images with one process)

    @property
    def trunk_s(self) -> float:
        """Network forward and backward (trunk and head dominate)."""
        return self.times.get("forward", 0.0) + self.times.get("backward", 0.0)

    @property
    def method_s(self) -> float:
        """Time in the method's own parts beyond the network (e.g. SwAV's Sinkhorn, loss and queue)."""
        return sum(v for k, v in self.times.items() if k not in ("forward", "backward", "optim"))


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


class _Objective(nn.Module):
    """What DDP wraps: its forward is the method's loss (DDP needs the forward it prepares to go through it)."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, views: Sequence[Tensor], mark: Any, step: int,
                ids: Sequence[str] | None) -> tuple[Tensor, dict[str, Tensor | float]]:
        return self.method.loss(views, mark, step, ids)


def _ddp(method: Method, device: torch.device) -> DDP:
    """DDP around the method's loss. Per-rank state (SwAV's queue) stays per rank: ``broadcast_buffers=False``
    (torch 2.14 deprecates it for ``forward_sync_buffers``, which would still broadcast them at start: the
    replacement it names for rank-local buffers is not there yet)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DDP(_Objective(method), device_ids=[device.index] if device.type == "cuda" else None,
                   broadcast_buffers=False)


class Learner:
    """A method, its optimizer and the step counter.

    Args:
        method: the network and objective (``make_method`` builds the configured one).
        cfg: optimisation (optimizer, schedule, bf16).
        device: where the method lives; views are moved there.
        channels_last: convolutions in NHWC memory format.
        sync_bn: with a process group, batch norm over every rank's batch.
    """

    def __init__(self, method: Method, cfg: LearnerConfig, *, device: str | torch.device = "cpu",
                 channels_last: bool = False, sync_bn: bool = True) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.world_size = torch.distributed.get_world_size() if distributed.initialized() else 1
        if self.world_size > 1 and sync_bn:
            method = convert_sync_batchnorm(method, self.device)
        self.method = method.to(self.device, memory_format=self.memory_format)
        self._ddp = _ddp(self.method, self.device) if self.world_size > 1 else None
        self.optimizer = build_optimizer(method.param_groups(cfg.weight_decay), cfg)
        self.step_count = 0
        self.n_skipped = 0
        self.use_bf16 = cfg.bf16 and native_bf16(self.device)
        if cfg.bf16 and not self.use_bf16:
            _warn_once(f"learner.bf16: {self.device} has no native bfloat16 (CPU: AVX512_BF16 or AMX; GPU: "
                       "Ampere or newer), where autocast emulates it and runs several times slower: float32")
        self.timer = StepTimer(self.device, method.parts + ENGINE_PARTS)

    @classmethod
    def build(cls, model_cfg: ModelConfig, cfg: LearnerConfig, *, device: str | torch.device = "cpu",
              reduce: Reduce | None = None, settings: Any = None, sync_bn: bool = True) -> Learner:
        """The configured method (``learner.method``, with its section ``settings``), initialised from
        ``learner.seed`` without touching the caller's RNG, and its engine."""
        device = torch.device(device)
        if reduce is None and distributed.initialized():
            reduce = distributed.reduce_for_sinkhorn  # SwAV's Sinkhorn sums over every rank's rows
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            method = make_method(model_cfg, cfg, device=device, reduce=reduce, settings=settings)
        return cls(method, cfg, device=device, channels_last=model_cfg.channels_last, sync_bn=sync_bn)

    @property
    def model(self) -> Method:
        """The method's network (``.trunk`` is what evaluation, export and the probe use)."""
        return self.method

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def step(self, views: Sequence[Tensor], progress: float | None = None,
             ids: Sequence[str] | None = None) -> StepStats:
        """One step of the method on a batch.

        Args:
            views: V tensors (B, 3, H_v, W_v), same B; views of equal size should be adjacent.
            progress: fraction of the run's budget used, in [0, 1]; needed by the ``budget`` schedule only.
            ids: a stable id per image of the batch (for methods with an instance memory), or None.
        """
        method, timer, step = self.method, self.timer, self.step_count
        batch = views[0].shape[0]
        if any(v.shape[0] != batch for v in views):
            raise ValueError("every view needs the same batch size")
        t_start = time.perf_counter()
        timer.start()
        lr = lr_at(step, self.cfg, progress)
        set_lr(self.optimizer, lr)
        saved = [(b, b.detach().clone()) for b in method.forward_buffers()]  # restored if the step is skipped
        method.train()
        views = [v.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format) for v in views]
        with self._autocast():
            loss, diagnostics = (self._ddp or method.loss)(views, timer.mark, step, ids)

        loss.backward()  # a non-finite loss gives non-finite gradients: the one check below catches both
        method.after_backward(step)
        timer.mark("backward")

        # The step's one wait for the device before its end: whether the update may be applied.
        grads = [p.grad for p in method.parameters() if p.grad is not None]
        finite = torch.isfinite(loss.detach())
        if grads:
            finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        names = [k for k, v in diagnostics.items() if isinstance(v, Tensor)]
        shared = None
        if self._ddp is not None:  # the finite flag, loss, diagnostics and images of every rank, in one collective
            shared = torch.stack([(~finite).float(), loss.detach().float(),
                                  *(diagnostics[k].detach().float() for k in names),
                                  torch.tensor(float(batch), device=loss.device)])
            shared = distributed.all_reduce_(shared).tolist()
            finite = torch.tensor(shared[0] == 0)
        skipped = not bool(finite)
        if skipped:
            self.n_skipped += 1
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)
        else:
            self.optimizer.step()
            self.step_count += 1
        self.optimizer.zero_grad(set_to_none=True)
        timer.mark("optim")
        if not skipped:
            method.after_update(step)
        timer.mark("update")

        # Every number of the step in one transfer (on CUDA: the second and last wait); several ranks: their mean.
        if shared is None:
            values = torch.stack([loss.detach().float(), *(diagnostics[k].detach().float() for k in names)]).tolist()
            all_images = batch
        else:
            values = [v / self.world_size for v in shared[1:-1]]
            all_images = int(shared[-1])
        read = {k: float(v) for k, v in diagnostics.items() if not isinstance(v, Tensor)}
        read |= {k: v + 0.0 for k, v in zip(names, values[1:], strict=True)}  # + 0.0: no "-0.000" in progress
        return StepStats(step=self.step_count, n_images=batch, loss=values[0] if not skipped else math.nan, lr=lr,
                         skipped=skipped, diagnostics={k: read[k] for k in diagnostics}, times=timer.read(),
                         total_s=time.perf_counter() - t_start,
                         embeddings=None if skipped else method.embeddings, all_images=all_images)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue learning: the method's network and state, optimizer and counters."""
        return {"method": self.method.name, "model": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "extra": self.method.extra_state(),
                "step": self.step_count, "n_skipped": self.n_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("method", "swav")  # checkpoints before methods were SwAV's
        if saved != self.method.name:
            raise ValueError(f"the checkpoint is of learner.method {saved!r}, this run is {self.method.name!r}")
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_extra_state(state.get("extra", state))  # older checkpoints: the method's keys at the top
        self.step_count = int(state["step"])
        self.n_skipped = int(state["n_skipped"])


__all__ = ["ENGINE_PARTS", "Learner", "StepStats"]
