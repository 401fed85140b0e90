"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning").

An online network (trunk, projection head, predictor) learns to predict, for each view of an image, the
projection of another view made by a target network (trunk and head) whose weights are an exponential moving
average of the online ones and which gets no gradient. The loss is the normalised MSE of the paper,
``2 - 2 cos(q, z')``, with no negatives. With two views it is the paper's symmetrised loss (averaged over the
two directions rather than summed: a factor of 2 in the learning rate). With more views (multi-crop) the
targets are the first two (the global) views and every view predicts each target of another view.

The momentum follows the paper's cosine, counted in steps rather than over a known training length: from
``byol.momentum`` at step 0 to ``byol.final_momentum`` after ``byol.momentum_steps``, then constant (the paper
ends at 1 with its training; an unbounded stream keeps a target that still follows). The target moves only
after an applied update, never after a skipped step. The target's batch norm uses batch statistics, as in the
authors' implementation.

Health: the spread of the online projections across the batch (``embedding_std``: a collapsed BYOL maps every
image to one point). Recovery: the rollback, then the target held at ``final_momentum`` (its slowest) for
the recovery, so it cannot follow the online network back into collapse quickly.

The paper's asymmetric views (one view always blurred and never solarised, the other rarely blurred and
sometimes solarised) are two size groups of one view each with per-group probabilities: ``augment.sizes =
[S, S]``, ``n_views = [1, 1]``, ``blur_p = [1.0, 0.1]``, ``solarize_p = [0.0, 0.2]``. Without them both views
share the recipe of their size group.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.config import BYOLConfig, LearnerConfig, ModelConfig
from streamssl.learner.methods.base import (
    EMBEDDING_STD,
    Mark,
    Method,
    ema_,
    embedding_std,
    features_by_size,
    make_encoder,
)


def normalized_mse(p: Tensor, z: Tensor) -> Tensor:
    """``2 - 2 cos(p, z)`` per row (the squared distance of the unit vectors), averaged over rows."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()


def momentum_at(step: int, settings: BYOLConfig) -> float:
    """The target's EMA momentum at ``step``: a cosine from ``momentum`` to ``final_momentum``, then constant."""
    t = min(step, settings.momentum_steps) / settings.momentum_steps
    return settings.final_momentum - (settings.final_momentum - settings.momentum) * (math.cos(math.pi * t) + 1) / 2


class BYOL(Method):
    """Online trunk, head and predictor; an EMA target trunk and head."""

    name = "byol"
    parts = ("forward", "target", "loss")
    diagnostics = (EMBEDDING_STD,)
    health = "embedding_std"

    def __init__(self, model_cfg: ModelConfig, cfg: LearnerConfig, *, device: torch.device,
                 settings: BYOLConfig | None = None, **_: Any) -> None:
        super().__init__()
        self.settings = settings or BYOLConfig()
        self.trunk, self.feature_dim, self.head, self.embed_dim = make_encoder(model_cfg)
        hidden = self.settings.predictor_dim
        self.predictor = nn.Sequential(nn.Linear(self.embed_dim, hidden), nn.BatchNorm1d(hidden),
                                       nn.ReLU(inplace=True), nn.Linear(hidden, self.embed_dim))
        self.target_trunk = copy.deepcopy(self.trunk).requires_grad_(False)
        self.target_head = copy.deepcopy(self.head).requires_grad_(False)
        self.recovering = False  # during a collapse recovery the target moves at final_momentum

    def _online(self) -> list[Tensor]:
        return [*self.trunk.parameters(), *self.head.parameters()]

    def _target(self) -> list[Tensor]:
        return [*self.target_trunk.parameters(), *self.target_head.parameters()]

    def loss(self, views: Sequence[Tensor], mark: Mark, step: int,
             ids: Sequence[str] | None = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        n_views = len(views)
        if n_views < 2:
            raise ValueError(f"BYOL needs at least 2 views, got {n_views}")
        batch = views[0].shape[0]
        z = self.head(features_by_size(self.trunk, views))  # (V*B, D)
        q = self.predictor(z)  # (V*B, D)
        mark("forward")
        self.embeddings = z[:batch].detach()
        with torch.no_grad():
            targets = self.target_head(features_by_size(self.target_trunk, views[:2]))  # (2B, D)
        mark("target")
        with torch.autocast(q.device.type, enabled=False):
            terms = [normalized_mse(q[v * batch:(v + 1) * batch], targets[t * batch:(t + 1) * batch])
                     for v in range(n_views) for t in (0, 1) if t != v]
            loss = torch.stack(terms).mean()
        mark("loss")
        return loss, {"embedding_std": embedding_std(z)}

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        tau = self.settings.final_momentum if self.recovering else momentum_at(step, self.settings)
        ema_(self._target(), self._online(), tau)

    def extra_state(self) -> dict[str, Any]:
        return {"recovering": self.recovering}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.recovering = bool(state.get("recovering", False))

    def start_recovery(self, step: int, recovery_steps: int, epsilon_factor: float) -> str:
        self.recovering = True
        return f"target momentum held at {self.settings.final_momentum} for {recovery_steps} steps"

    def end_recovery(self) -> str:
        self.recovering = False
        return "target momentum back on its schedule"


__all__ = ["BYOL", "momentum_at", "normalized_mse"]
