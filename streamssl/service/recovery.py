"""When training goes wrong, what the daemon does: a collapse (roll back to a healthy snapshot, then the
method's own recovery; collapse.py decides when) and a run of non-finite steps (say so, then stop).

Both act on the learner and report through the metrics, the run's history and the log; the daemon calls them
once a step and owns the decisions that end a run.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

from streamssl.config import Config
from streamssl.errors import RuntimeFailure
from streamssl.learner.engine import Learner, StepStats
from streamssl.service.collapse import Action, CollapseMonitor
from streamssl.service.metrics import Metrics
from streamssl.service.progress import History

log = logging.getLogger("streamssl.service.daemon")


class NonFiniteRun(RuntimeFailure):
    """Every step for ``run.max_nonfinite_steps`` was non-finite: the model or its input is broken."""


class CollapseRecovery:
    """Snapshots the learner while healthy; on collapse rolls it back and starts the method's recovery."""

    def __init__(self, cfg: Config, learner: Learner, metrics: Metrics, history: History) -> None:
        self.cfg, self.learner, self.metrics, self.history = cfg, learner, metrics, history
        self.monitor = CollapseMonitor(cfg.collapse, learner.method.health_max(cfg.learner.batch_size))
        self._snapshot: dict[str, Any] | None = None

    def watch(self, stats: StepStats) -> None:
        learner, cfg = self.learner, self.cfg
        health = learner.method.health
        if health is None or health not in stats.diagnostics:
            return
        value = stats.diagnostics[health]
        action = self.monitor.update(stats.step, value)
        if action is Action.SNAPSHOT:
            self._snapshot = copy.deepcopy(learner.state_dict())
        elif action is Action.RECOVER:
            collapsed_at = learner.step_count
            if self._snapshot is not None:
                learner.load_state_dict(copy.deepcopy(self._snapshot))
            what = learner.method.start_recovery(learner.step_count, cfg.collapse.recovery_steps,
                                                 cfg.collapse.epsilon_factor)
            self.monitor.start_recovery(learner.step_count)
            self.metrics.collapse(True)
            self.metrics.collapse_recovered()
            self.history.event({"time": round(time.time(), 3), "event": "collapse", "step": collapsed_at,
                                "rolled_back_to": learner.step_count, health: value})
            log.warning("collapse at step %d (%s %.3f for %d steps): rolled back to step %d, %s", collapsed_at,
                        health.replace("_", " "), value, cfg.collapse.patience_steps, learner.step_count, what)
        elif action is Action.RECOVERED:
            what = learner.method.end_recovery()
            self.metrics.collapse(False)
            self.history.event({"time": round(time.time(), 3), "event": "recovered", "step": learner.step_count})
            log.info("collapse recovery over at step %d; %s", learner.step_count, what)


class NonFiniteStreak:
    """Counts non-finite steps in a row: a line every ``run.log_every_steps`` of them, and the error that stops
    the run after ``run.max_nonfinite_steps``."""

    def __init__(self, cfg: Config, echo: Callable[[str], None], history: History) -> None:
        self.limit, self.every = cfg.run.max_nonfinite_steps, cfg.run.log_every_steps
        self.echo, self.history = echo, history
        self.streak = 0

    def reset(self) -> None:
        self.streak = 0

    def skipped(self, stats: StepStats, n_skipped: int, last_checkpoint: str | None) -> NonFiniteRun | None:
        """After a skipped step; the error to stop with once the streak reaches the limit, else None."""
        self.streak += 1
        streak, limit = self.streak, self.limit
        if streak % self.every == 0:
            self.echo(f"step {stats.step:>7} | skipped {streak} non-finite steps in a row "
                      f"({n_skipped} in all){f'; stopping at {limit}' if limit else ''}")
            self.history.event({"time": round(time.time(), 3), "event": "nonfinite", "step": stats.step,
                                "streak": streak, "skipped_steps": n_skipped})
        if not limit or streak < limit:
            return None
        return NonFiniteRun(
            f"the last {streak} steps were all non-finite (loss or gradients NaN or inf), so nothing was learned: "
            f"stopped without a checkpoint; the last good one is {last_checkpoint or 'none'}. Check the input "
            "and lower learner.base_lr, or resume from an older checkpoint (run.max_nonfinite_steps sets the limit)")


__all__ = ["CollapseRecovery", "NonFiniteRun", "NonFiniteStreak"]
