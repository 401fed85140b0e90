"""The online SwAV learner: one optimizer step per batch of views, no epochs, no dataset length.

Implements the SwAV training step of Caron et al. 2020 (Algorithm 1 and the authors' ``train()``): embed
every view (views of equal size together), compute the codes of the assignment views by Sinkhorn-Knopp (over
the queue and the batch once the queue is full), predict each code from every other view, step the optimizer,
renormalise the prototypes, then push the batch's assignment embeddings into the queue.

On top of the paper, for a process that must never stop: a NaN/inf guard (a step whose loss or gradients are
not finite is skipped and counted; parameters, batch-norm buffers, optimizer state and queue are left exactly
as they were), and per-step statistics an operator needs to see collapse coming (code entropy, prototypes in
use) and where the time goes.

The learner knows nothing of data loading, Redis, metrics or the CLI: it takes tensors and returns numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from streamssl.config import LearnerConfig, ModelConfig
from streamssl.devices import StepTimer, native_bf16
from streamssl.loss import swapped_prediction_loss
from streamssl.model import SwAVModel
from streamssl.optim import build_optimizer, lr_at, set_lr
from streamssl.queue import FeatureQueue
from streamssl.sinkhorn import Reduce, sinkhorn

log = logging.getLogger(__name__)

# Scores are cosines of unit embeddings and unit prototypes (renormalised after every update, never changed
# by a frozen or skipped step): they span at most 2, and a little more after bfloat16 rounding.
COSINE_SPREAD = 2.02


@dataclass(frozen=True)
class StepStats:
    """What one call of ``OnlineSwAV.step`` did. Times in seconds."""

    step: int  # optimizer steps applied so far (after this one)
    n_images: int  # images in the batch (B)
    loss: float  # swapped-prediction loss (nan when not finite)
    lr: float
    code_entropy: float  # nats; entropy of the batch's hard code histogram; near 0 means collapse
    n_prototypes_in_use: int  # distinct prototypes that are some sample's argmax code
    queue_fill: float  # 0..1; 0 when there is no queue
    queue_used: bool
    skipped: bool  # the update was skipped (non-finite loss or gradients)
    trunk_s: float  # network forward + backward (trunk and head dominate)
    sinkhorn_s: float  # codes, queue scores included
    loss_s: float  # swapped-prediction loss forward
    queue_s: float  # queue push
    normalize_s: float  # prototype renormalisation
    optim_s: float  # optimizer step and the gradient check
    total_s: float

    @property
    def swav_s(self) -> float:
        """Time in the parts specific to SwAV (Sinkhorn, queue, prototype normalisation, loss)."""
        return self.sinkhorn_s + self.loss_s + self.queue_s + self.normalize_s


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


class OnlineSwAV:
    """SwAV model, optimizer, queue and step counter.

    Args:
        model_cfg: trunk, head and prototypes.
        cfg: objective and optimisation.
        device: where the model lives; views are moved there.
        reduce: all-reduce for the Sinkhorn sums across processes (None: single process).
    """

    def __init__(self, model_cfg: ModelConfig, cfg: LearnerConfig, *, device: str | torch.device = "cpu",
                 reduce: Reduce | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.reduce = reduce
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            self.model = SwAVModel(model_cfg)
        self.memory_format = torch.channels_last if model_cfg.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)
        self.optimizer = build_optimizer(self.model, cfg)
        self.queue = (FeatureQueue(len(cfg.crops_for_assign), cfg.queue_length, self.model.embed_dim,
                                   start_step=cfg.queue_start_step, device=self.device)
                      if cfg.queue_length else None)
        self.step_count = 0
        self.n_skipped = 0
        self._assign_index = torch.tensor(cfg.crops_for_assign, device=self.device)
        self.timer = StepTimer(self.device, ("forward", "sinkhorn", "loss", "backward", "optim", "normalize",
                                             "queue"))
        self.use_bf16 = cfg.bf16 and native_bf16(self.device)
        if cfg.bf16 and not self.use_bf16:
            _warn_once(f"learner.bf16: {self.device} has no native bfloat16 (CPU: AVX512_BF16 or AMX; GPU: "
                       "Ampere or newer), where autocast emulates it and runs several times slower: float32")
        # Runtime knobs, initialised from the config; the daemon's collapse recovery changes them for a while.
        self.epsilon = cfg.epsilon
        self.frozen_until = cfg.freeze_prototypes_steps

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def step(self, views: Sequence[Tensor], progress: float | None = None) -> StepStats:
        """One SwAV step on a batch.

        Args:
            views: V tensors (B, 3, H_v, W_v), same B; views of equal size should be adjacent.
            progress: fraction of the run's budget used, in [0, 1]; needed by the ``budget`` schedule only.
        """
        cfg, model = self.cfg, self.model
        n_views = len(views)
        if n_views < 2 or max(cfg.crops_for_assign) >= n_views:
            raise ValueError(f"{n_views} views given; crops_for_assign {cfg.crops_for_assign} needs more")
        batch = views[0].shape[0]
        if any(v.shape[0] != batch for v in views):
            raise ValueError("every view needs the same batch size")
        t_start = time.perf_counter()
        timer = self.timer
        timer.start()
        lr = lr_at(self.step_count, cfg, progress)
        set_lr(self.optimizer, lr)

        buffers = [b.detach().clone() for b in model.buffers()]  # restored if the step is skipped
        model.train()
        views = [v.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format) for v in views]
        with self._autocast():
            emb, scores = model(views)  # (V*B, D), (V*B, K)
        timer.mark("forward")

        use_queue = self.queue is not None and self.queue.active(self.step_count)
        codes = []
        with torch.no_grad():
            protos = model.prototypes.weight.detach().float()  # (K, D)
            for i, s in enumerate(cfg.crops_for_assign):
                if scores.dtype == torch.float32:
                    out = scores[s * batch:(s + 1) * batch].detach()  # (B, K)
                else:
                    # Under autocast the scores are bfloat16: their rounding moves the codes 2.5-4.7x more than
                    # float32 scores of the same (bfloat16) embeddings do (`streamssl bench sinkhorn`), and the
                    # queue's rows are scored in float32 too. One (B x D x K) matmul buys that back.
                    out = emb[s * batch:(s + 1) * batch].detach().float() @ protos.T  # (B, K)
                if use_queue:
                    assert self.queue is not None
                    out = torch.cat([self.queue.embeddings(i) @ protos.T, out])  # (Q+B, K): queue rows first
                codes.append(sinkhorn(out, n_iters=cfg.sinkhorn_iters, eps=self.epsilon, reduce=self.reduce,
                                     max_spread=COSINE_SPREAD)[-batch:])
        timer.mark("sinkhorn")

        loss = swapped_prediction_loss(scores, codes, cfg.crops_for_assign, n_views, cfg.temperature)
        timer.mark("loss")

        frozen = self.step_count < self.frozen_until
        loss.backward()  # a non-finite loss gives non-finite gradients: the one check below catches both
        if frozen:
            model.prototypes.weight.grad = None  # frozen: no gradient, so no decay or momentum either
        timer.mark("backward")

        # The step's one wait for the device before its end: whether the update may be applied.
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = torch.isfinite(loss.detach())
        if grads:
            finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        skipped = not bool(finite)
        if skipped:
            self.n_skipped += 1
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers, strict=True):
                    b.copy_(saved)
        else:
            self.optimizer.step()
            self.step_count += 1
        self.optimizer.zero_grad(set_to_none=True)
        timer.mark("optim")

        # Renormalised right after each update rather than before each forward (the authors' place): the
        # same prototypes meet every forward, and a skipped or frozen step leaves them bit-for-bit unchanged.
        if not skipped and not frozen:
            model.normalize_prototypes()
        timer.mark("normalize")

        if self.queue is not None and not skipped:
            self.queue.push(emb.detach().float().view(n_views, batch, -1)[self._assign_index])  # (A, B, D)
        timer.mark("queue")

        # Every number of the step in one transfer (on CUDA: the second and last wait).
        entropy, in_use = _hard_code_usage(codes)
        loss_value, entropy_value, in_use_value = torch.stack(
            [loss.detach().float(), entropy, in_use.float()]).tolist()
        t = timer.read()
        return StepStats(
            step=self.step_count, n_images=batch, loss=loss_value if not skipped else math.nan, lr=lr,
            code_entropy=entropy_value + 0.0, n_prototypes_in_use=int(in_use_value),  # + 0.0: no "-0.000"
            queue_fill=self.queue.fill if self.queue is not None else 0.0, queue_used=use_queue,
            skipped=skipped, trunk_s=t["forward"] + t["backward"], sinkhorn_s=t["sinkhorn"], loss_s=t["loss"],
            queue_s=t["queue"], normalize_s=t["normalize"], optim_s=t["optim"],
            total_s=time.perf_counter() - t_start,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue learning: model, optimizer, queue and counters."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "queue": self.queue.state_dict() if self.queue is not None else None,
            "step": self.step_count,
            "n_skipped": self.n_skipped,
            "epsilon": self.epsilon,
            "frozen_until": self.frozen_until,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if (state["queue"] is None) != (self.queue is None):
            raise ValueError("checkpoint and configuration disagree on whether there is a queue")
        if self.queue is not None:
            self.queue.load_state_dict(state["queue"])
        self.step_count = int(state["step"])
        self.n_skipped = int(state["n_skipped"])
        self.epsilon = float(state.get("epsilon", self.cfg.epsilon))
        self.frozen_until = int(state.get("frozen_until", self.cfg.freeze_prototypes_steps))


def _hard_code_usage(codes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Entropy (nats) of the histogram of argmax codes over all assignment views, and its support size, as
    0-d tensors on the codes' device (read with the step's other numbers, in one transfer)."""
    hard = torch.cat([q.argmax(dim=1) for q in codes])  # (A*B,)
    counts = torch.bincount(hard).float()
    in_use = (counts > 0).sum()
    p = counts / counts.sum()
    return -torch.special.xlogy(p, p).sum(), in_use
