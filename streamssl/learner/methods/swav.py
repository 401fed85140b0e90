"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments").

Algorithm 1 and the authors' ``train()``: embed every view (views of equal size together), compute the codes
of the assignment views by Sinkhorn-Knopp (over the queue and the batch once the queue is full), predict each
code from every other view (the swapped prediction), then, after the update, renormalise the prototypes and
push the batch's assignment embeddings into the queue. Network: ResNet trunk -> projection head ->
L2-normalised embedding -> prototypes (a bias-free Linear whose rows stay unit vectors, so scores are cosines).

Prototypes get no gradient for ``freeze_prototypes_steps`` (the paper's early-training stabiliser), and a
collapse recovery freezes them again with a smaller eps. Renormalised right after each update rather than
before each forward (the authors' place): the same prototypes meet every forward, and a skipped or frozen
step leaves them bit-for-bit unchanged. Under bf16 autocast the codes come from float32 scores of the
embeddings: bfloat16 scores move the codes 2.5-4.7x more (``streamssl bench sinkhorn``), and the queue's rows
are scored in float32 too.

Diagnostics: the entropy of the batch's hard code histogram and the prototypes in use (collapse puts every
image on one prototype: entropy 0), and the queue's fill.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.config import LearnerConfig, ModelConfig
from streamssl.distributed import initialized
from streamssl.learner.methods.base import Diagnostic, Mark, Method, features_by_size, make_encoder
from streamssl.learner.methods.sinkhorn import Reduce, sinkhorn
from streamssl.learner.methods.swav_loss import swapped_prediction_loss
from streamssl.learner.methods.swav_queue import FeatureQueue, reshard_queue

# Scores are cosines of unit embeddings and unit prototypes (renormalised after every update, never changed
# by a frozen or skipped step): they span at most 2, and a little more after bfloat16 rounding.
COSINE_SPREAD = 2.02


class SwAV(Method):
    """Trunk, head, prototypes and queue; ``loss`` is the swapped prediction of Sinkhorn codes."""

    name = "swav"
    parts = ("forward", "sinkhorn", "loss")
    diagnostics = (
        Diagnostic("code_entropy", "streamssl_learner_code_entropy_nats", "Entropy of the batch's hard code "
                   "histogram in nats; near 0 means collapse (at most log(min(B, K))).", "code entropy"),
        Diagnostic("prototypes_in_use", "streamssl_learner_prototypes_in_use", "Distinct prototypes that are some "
                   "sample's argmax code in the last batch.", "prototypes in use", "{:>4.0f}"),
        Diagnostic("queue_fill", "streamssl_learner_queue_fill_ratio", "Feature queue fill, 0..1 (0 without a "
                   "queue).", "queue", "{:4.0%}"),
    )
    health = "code_entropy"

    def __init__(self, model_cfg: ModelConfig, cfg: LearnerConfig, *, device: torch.device,
                 reduce: Reduce | None = None, **_: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.reduce = reduce
        self.trunk, self.feature_dim, self.head, self.embed_dim = make_encoder(model_cfg)
        self.prototypes = nn.Linear(self.embed_dim, model_cfg.n_prototypes, bias=False)
        self.normalize_prototypes()
        # The queue is the job's: each of N ranks keeps Q/N rows of its own batches, and Sinkhorn's sums
        # over ranks (``reduce``) see all Q, as in the authors' code.
        self.queue = (FeatureQueue(len(cfg.crops_for_assign), queue_rows(cfg.queue_length), self.embed_dim,
                                   start_step=cfg.queue_start_step, device=device)
                      if cfg.queue_length else None)
        self._assign_index = torch.tensor(cfg.crops_for_assign, device=device)
        # Runtime knobs, initialised from the config; a collapse recovery changes them for a while.
        self.epsilon = cfg.epsilon
        self.frozen_until = cfg.freeze_prototypes_steps
        self._emb: Tensor | None = None  # the last forward's embeddings, for the queue push after the update
        self._n_views = 0

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise every prototype (row of the weight), in place."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))

    def forward(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """V view batches -> (V*B, D) L2-normalised embeddings and (V*B, K) prototype scores, view-major."""
        emb = F.normalize(self.head(features_by_size(self.trunk, views)), dim=1)
        return emb, self.prototypes(emb)

    def loss(self, views: Sequence[Tensor], mark: Mark, step: int,
             ids: Sequence[str] | None = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        cfg, n_views, batch = self.cfg, len(views), views[0].shape[0]
        if n_views < 2 or max(cfg.crops_for_assign) >= n_views:
            raise ValueError(f"{n_views} views given; crops_for_assign {cfg.crops_for_assign} needs more")
        emb, scores = self(views)  # (V*B, D), (V*B, K)
        mark("forward")
        self._emb, self._n_views = emb.detach(), n_views
        self.embeddings = self._emb[:batch]
        # Codes and loss in float32 outside autocast: only the network runs in bfloat16.
        with torch.autocast(emb.device.type, enabled=False):
            codes = self._codes(emb, scores, batch, step)
            mark("sinkhorn")
            loss = swapped_prediction_loss(scores, codes, cfg.crops_for_assign, n_views, cfg.temperature)
            mark("loss")
        entropy, in_use = hard_code_usage(codes)
        return loss, {"code_entropy": entropy, "prototypes_in_use": in_use,
                      "queue_fill": self.queue.fill if self.queue is not None else 0.0}

    @torch.no_grad()
    def _codes(self, emb: Tensor, scores: Tensor, batch: int, step: int) -> list[Tensor]:
        """Sinkhorn codes (B, K) of each assignment view, over the queue's rows and the batch's."""
        cfg = self.cfg
        use_queue = self.queue is not None and self.queue.active(step)
        protos = self.prototypes.weight.detach().float()  # (K, D)
        codes = []
        for i, s in enumerate(cfg.crops_for_assign):
            if scores.dtype == torch.float32:
                out = scores[s * batch:(s + 1) * batch].detach()  # (B, K)
            else:  # bfloat16 under autocast: float32 scores of the same embeddings (module docstring)
                out = emb[s * batch:(s + 1) * batch].detach().float() @ protos.T  # (B, K)
            if use_queue:
                assert self.queue is not None
                out = torch.cat([self.queue.embeddings(i) @ protos.T, out])  # (Q+B, K): queue rows first
            codes.append(sinkhorn(out, n_iters=cfg.sinkhorn_iters, eps=self.epsilon, reduce=self.reduce,
                                  max_spread=COSINE_SPREAD)[-batch:])
        return codes

    def after_backward(self, step: int) -> None:
        if step < self.frozen_until:
            self.prototypes.weight.grad = None  # frozen: no gradient, so no decay or momentum either

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        if step >= self.frozen_until:
            self.normalize_prototypes()
        if self.queue is not None and self._emb is not None:
            emb = self._emb.float()
            self.queue.push(emb.view(self._n_views, emb.shape[0] // self._n_views, -1)[self._assign_index])
        self._emb = None

    def extra_state(self) -> dict[str, Any]:
        return {"queue": self.queue.state_dict() if self.queue is not None else None,
                "epsilon": self.epsilon, "frozen_until": self.frozen_until}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if (state.get("queue") is None) != (self.queue is None):
            raise ValueError("checkpoint and configuration disagree on whether there is a queue")
        if self.queue is not None:
            self.queue.load_state_dict(state["queue"])
        self.epsilon = float(state.get("epsilon", self.cfg.epsilon))
        self.frozen_until = int(state.get("frozen_until", self.cfg.freeze_prototypes_steps))

    def merge_rank_states(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        """The queue is the job's: every saved rank's rows, re-split over the new ranks."""
        if self.queue is None or states[0].get("queue") is None:
            return states[0]
        return {**states[0], "queue": reshard_queue([s["queue"] for s in states], rank, world, self.queue.length)}

    def published(self) -> Tensor:
        return self.prototypes.weight

    def health_max(self, batch_size: int) -> float:
        return max_code_entropy(batch_size, len(self.cfg.crops_for_assign), self.prototypes.out_features)

    def start_recovery(self, step: int, recovery_steps: int, epsilon_factor: float) -> str:
        self.frozen_until = step + recovery_steps
        self.epsilon = self.cfg.epsilon * epsilon_factor
        return f"prototypes frozen and eps {self.epsilon:.3f} for {recovery_steps} steps"

    def end_recovery(self) -> str:
        self.epsilon = self.cfg.epsilon
        return f"eps back to {self.epsilon:.3f}"


def queue_rows(length: int) -> int:
    """This rank's share of a job-wide queue of ``length`` rows."""
    world = torch.distributed.get_world_size() if initialized() else 1
    return max(1, length // world)


def max_code_entropy(n_images: int, n_assign: int, n_prototypes: int) -> float:
    """Largest possible entropy of a hard code histogram over n_images x n_assign codes: ln(min(B x A, K))."""
    return math.log(max(2, min(n_images * n_assign, n_prototypes)))


def hard_code_usage(codes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``label_usage`` of the argmax codes of all assignment views."""
    return label_usage(torch.cat([q.argmax(dim=1) for q in codes]))  # (A*B,)


def label_usage(hard: Tensor) -> tuple[Tensor, Tensor]:
    """Entropy (nats) of the histogram of hard labels (N,), and its support size, as 0-d tensors on their
    device (read with the step's other numbers, in one transfer)."""
    counts = torch.bincount(hard).float()
    in_use = (counts > 0).sum()
    p = counts / counts.sum()
    return -torch.special.xlogy(p, p).sum(), in_use


__all__ = ["COSINE_SPREAD", "SwAV", "hard_code_usage", "label_usage", "max_code_entropy", "queue_rows"]
