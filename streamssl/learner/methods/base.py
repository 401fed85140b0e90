"""What a self-supervised method is to the engine (engine.py): a network and an objective with hooks.

A ``Method`` is an ``nn.Module`` that holds everything it trains and everything it keeps between steps (a
queue, a momentum encoder, prototypes, a memory). Its ``trunk`` attribute is the encoder that evaluation,
export and the live probe use; every method names it ``trunk`` so that a checkpoint's ``trunk.*`` weights
are found the same way whatever the method.

The engine calls, for each batch of views:

1. ``loss(views, mark, step, ids)`` under autocast: the objective, and the method's diagnostics as 0-d
   tensors (read with the step's other numbers in one transfer). ``mark(part)`` ends each of the method's
   timed ``parts`` in order. ``ids``: a stable id per image (``Sample.id``: shard URL and member key), for
   methods that remember instances (NPID); None where the views come without samples (benchmarks).
2. ``after_backward(step)``: change gradients before the finite check (e.g. cancel frozen prototypes').
3. ``after_update(step)``: only after an applied update, never after a skipped one: renormalise, EMA,
   push into a queue or memory.

Each ``loss`` also leaves ``embeddings``: the (B, D) embeddings of the batch's first view, detached (what a
MinRed replay buffer compares samples by, at no extra forward pass).

``step`` is the index of the step being made (0 for the first). ``extra_state``/``load_extra_state`` carry
what is not a parameter or buffer; with several ranks each saves its own, and ``merge_rank_states`` says
what a rank takes when the number of ranks changed. ``published()`` is the tensor the prototype store holds (SwAV's
prototypes, DeepCluster's centroids), or None. Collapse: ``health`` names the diagnostic the collapse monitor
watches, ``health_max`` its healthy ceiling, ``start_recovery``/``end_recovery`` the method's own way back
after the daemon rolled it back to a healthy snapshot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from streamssl.config import ModelConfig
from streamssl.learner.model import TRUNK_DIMS, make_head, make_trunk
from streamssl.learner.optim import param_groups

Mark = Callable[[str], None]


@dataclass(frozen=True)
class Diagnostic:
    """One number a method reports every step: its key, its Prometheus gauge and how the progress line shows it.

    Declared up front (``Method.diagnostics``) so that a run's metric series are fixed from its start."""

    name: str  # key in StepStats.diagnostics and history.jsonl
    metric: str  # Prometheus gauge (streamssl_learner_...)
    help: str
    label: str  # progress line: "<label> <value>"
    fmt: str = "{:5.2f}"


class Method(nn.Module):
    """Base of every method; see the module docstring for the protocol."""

    name: ClassVar[str]
    parts: ClassVar[tuple[str, ...]] = ("forward",)  # timed parts of loss(), marked in this order
    diagnostics: ClassVar[tuple[Diagnostic, ...]] = ()
    health: ClassVar[str | None] = None  # the diagnostic collapse detection watches; None: no detection
    trunk: nn.Module
    embed_dim: int
    embeddings: Tensor | None = None  # (B, D) of the last loss()'s first view, detached

    def loss(self, views: Sequence[Tensor], mark: Mark, step: int,
             ids: Sequence[str] | None = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        raise NotImplementedError

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The optimizer's groups: weights decayed and LARS-adapted, BN parameters and biases neither."""
        return param_groups(self, weight_decay)

    def forward_buffers(self) -> list[Tensor]:
        """The buffers a forward pass changes in place, which the engine restores after a skipped step: the
        batch-norm statistics. A method's own state (a queue, a memory, centroids) changes only in
        ``after_update``, which a skipped step never reaches, so it is not copied every step."""
        return [b for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]

    def after_backward(self, step: int) -> None:
        """Gradients computed, update not yet decided."""

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        """The update of step ``step`` was applied."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``extra_state``; a key it lacks (an older checkpoint) keeps the configured value."""

    def merge_rank_states(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        """This rank's ``extra_state`` when a checkpoint of ``len(states)`` ranks resumes on ``world`` ranks. By
        default rank 0's: state fed by every rank is the same on all (MoCo's queue, NPID's bank)."""
        return states[0]

    def published(self) -> Tensor | None:
        return None

    def health_max(self, batch_size: int) -> float:
        """The health signal's value in a healthy run (collapse is a fraction of it). By default the ceiling
        of ``EMBEDDING_STD``: 1/sqrt(D), unit embeddings spread over the sphere."""
        return 1 / math.sqrt(self.embed_dim)

    def start_recovery(self, step: int, recovery_steps: int, epsilon_factor: float) -> str:
        """After a rollback to a healthy snapshot: change what the method does for ``recovery_steps``; returns
        what it did, for the log."""
        return "rolled back"

    def end_recovery(self) -> str:
        return "recovery over"


EMBEDDING_STD = Diagnostic(
    "embedding_std", "streamssl_learner_embedding_std", "Standard deviation across the batch of the unit-norm "
    "embeddings, averaged over dimensions: 1/sqrt(D) when they spread over the sphere, 0 when every image maps "
    "to one point (collapse; the SimSiam and BYOL diagnostic).", "embedding std", "{:6.4f}")


def embedding_std(z: Tensor) -> Tensor:
    """``EMBEDDING_STD`` of (N, D) embeddings, as a 0-d tensor (normalised here, in float32)."""
    return torch.nn.functional.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def make_encoder(cfg: ModelConfig) -> tuple[nn.Module, int, nn.Module, int]:
    """The encoder every method starts from: (trunk, its feature width, projection head, embedding width D),
    built in that order (the order fixes the seeded initialisation)."""
    trunk = make_trunk(cfg.arch, small_stem=cfg.small_stem, stem_stride=cfg.stem_stride, stem_pool=cfg.stem_pool)
    head = make_head(TRUNK_DIMS[cfg.arch], cfg.hidden_dim, cfg.out_dim)
    return trunk, TRUNK_DIMS[cfg.arch], head, cfg.out_dim or TRUNK_DIMS[cfg.arch]


@torch.no_grad()
def ema_(target: list[Tensor], online: list[Tensor], momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online``, in place, with multi-tensor ops."""
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, online, alpha=1 - momentum)


def ring_slots(ptr: Tensor, n: int, length: int) -> Tensor:
    """Slots of the next ``n`` rows of a FIFO ring of ``length`` rows (the oldest first overwritten); advances
    ``ptr`` (a 0-d long buffer) past them. ``n`` <= ``length``."""
    index = (ptr + torch.arange(n, device=ptr.device)) % length
    ptr.copy_((ptr + n) % length)
    return index


def features_by_size(trunk: nn.Module, views: Sequence[Tensor]) -> Tensor:
    """(V*B, F) trunk features; consecutive views of equal size share one trunk call (one batch-norm batch per
    resolution, as in SwAV's multi-crop forward)."""
    out: list[Tensor] = []
    start = 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        batch = torch.cat(list(views[start:end])) if end - start > 1 else views[start]
        out.append(trunk(batch))
        start = end
    return torch.cat(out) if len(out) > 1 else out[0]


__all__ = ["EMBEDDING_STD", "Diagnostic", "Mark", "Method", "ema_", "embedding_std", "features_by_size",
           "make_encoder", "ring_slots"]
