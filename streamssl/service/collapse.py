"""Collapse: noticing it, and a documented way back, for any method.

A self-supervised method collapses when its representation stops carrying information while the loss can
still look fine: SwAV puts every image on the same few prototypes (the entropy of the batch's hard code
histogram falls towards 0); contrastive and BYOL-style methods map every image to nearly the same embedding
(the spread of the embeddings across the batch falls towards 0). Each method names the diagnostic that shows
it (``Method.health``) and its healthy ceiling (``Method.health_max``: ln(min(images x assignment views, K))
for SwAV's code entropy).

Detection: the signal below ``min_entropy_ratio`` x that ceiling for ``patience_steps`` consecutive steps.

Recovery (applied by the daemon): roll the learner back to the last in-memory snapshot taken while healthy
(network, optimizer, method state), then for ``recovery_steps`` let the method do what stabilises it
(``Method.start_recovery``; SwAV keeps the prototypes frozen and Sinkhorn's eps lowered by
``epsilon_factor``: the paper's own early-training stabiliser and a sharper equipartition both push samples
apart while the trunk finds its way again). If collapse returns after the recovery, it is recovered again (and
counted): an operator watching the recoveries counter should lower the learning rate.

This module decides; it holds no tensors and touches no learner state.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from streamssl.config import CollapseConfig


class Action(Enum):
    NONE = "none"
    SNAPSHOT = "snapshot"  # healthy: take a snapshot now
    RECOVER = "recover"  # collapsed: roll back and start a recovery
    RECOVERED = "recovered"  # the recovery period ended


@dataclass
class CollapseMonitor:
    """Feed it each step's health signal; it says when to snapshot, recover, and when a recovery ended."""

    cfg: CollapseConfig
    healthy: float  # the signal's healthy ceiling (Method.health_max)
    low_steps: int = 0  # consecutive steps below the threshold
    recovering_until: int = -1  # step at which the current recovery ends (-1: none)
    last_snapshot_step: int = -1

    @property
    def enabled(self) -> bool:
        return self.cfg.min_entropy_ratio > 0

    @property
    def collapsed(self) -> bool:
        """True from detection to the end of the recovery."""
        return self.recovering_until >= 0

    def update(self, step: int, value: float) -> Action:
        if not self.enabled:
            return Action.NONE
        low = value < self.cfg.min_entropy_ratio * self.healthy
        self.low_steps = self.low_steps + 1 if low else 0
        if self.recovering_until >= 0:
            if step >= self.recovering_until:
                self.recovering_until = -1
                self.low_steps = 0
                return Action.RECOVERED
            return Action.NONE
        if self.low_steps >= self.cfg.patience_steps:
            self.start_recovery(step)
            return Action.RECOVER
        if not low and self.low_steps == 0 and (self.last_snapshot_step < 0 or
                                                step - self.last_snapshot_step >= self.cfg.snapshot_every_steps):
            self.last_snapshot_step = step
            return Action.SNAPSHOT
        return Action.NONE

    def start_recovery(self, step: int) -> None:
        """The recovery runs from ``step`` (the learner's step after any rollback) for ``recovery_steps``."""
        self.recovering_until = step + self.cfg.recovery_steps
        self.low_steps = 0
