"""What a run tells people: one progress line per interval, and its own record, ``history.jsonl`` in the run
folder (one JSON line per progress line, plus events), which ``streamssl report`` draws."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from streamssl.learner import StepStats


def format_progress(stats: StepStats, images_per_s: float, wait_share: float, n_prototypes: int,
                    skipped: int = 0) -> str:
    """One concise progress line."""
    return (f"step {stats.step:>7} | {images_per_s:7.1f} img/s | loss {stats.loss:6.3f} | lr {stats.lr:.2e} | "
            f"code entropy {stats.code_entropy:5.2f} | prototypes in use {stats.n_prototypes_in_use:>4}/"
            f"{n_prototypes} | queue {stats.queue_fill:4.0%} | data wait {wait_share:4.0%} | skipped {skipped}")


class History:
    """The run's own record: one JSON line per progress line, appended to ``history.jsonl`` in the run folder
    (``streamssl report`` draws it). Survives restarts: a resumed run appends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = None

    def write(self, stats: StepStats, **extra: float) -> None:
        record = {"time": round(time.time(), 3), "step": stats.step, "loss": stats.loss, "lr": stats.lr,
                  "code_entropy": stats.code_entropy, "prototypes_in_use": stats.n_prototypes_in_use,
                  "queue_fill": stats.queue_fill, **extra}
        self.event(record)

    def event(self, record: dict[str, Any]) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - kept open for the run
        self._file.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()})
                         + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = ["History", "format_progress"]
