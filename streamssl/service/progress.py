"""What a run tells people: one progress line per interval, and its own record, ``history.jsonl`` in the run
folder (one JSON line per progress line, plus events), which ``streamssl report`` draws."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from streamssl.learner.engine import StepStats
from streamssl.learner.methods.base import Diagnostic

log = logging.getLogger("streamssl.service.daemon")


def format_progress(stats: StepStats, images_per_s: float, wait_share: float, diagnostics: Sequence[Diagnostic],
                    skipped: int = 0, *, limits: dict[str, str] | None = None) -> str:
    """One concise progress line: the generic numbers, then the method's diagnostics as it declares them
    (``limits``: a suffix per diagnostic, e.g. "/3000" after the prototypes in use)."""
    fields = [f"step {stats.step:>7}", f"{images_per_s:7.1f} img/s", f"loss {stats.loss:6.3f}", f"lr {stats.lr:.2e}"]
    for d in diagnostics:
        if d.name in stats.diagnostics:
            fields.append(f"{d.label} {d.fmt.format(stats.diagnostics[d.name])}{(limits or {}).get(d.name, '')}")
    return " | ".join([*fields, f"data wait {wait_share:4.0%}", f"skipped {skipped}"])


class ProgressWindow:
    """Images trained on and time spent waiting for data since the last progress line."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.images, self.wait_s, self.start = 0, 0.0, time.monotonic()

    def add(self, images: int, wait_s: float) -> None:
        self.images += images
        self.wait_s += wait_s

    def close(self) -> tuple[float, float]:
        """(images per second, share of the time spent waiting for data) of the window; the next one starts."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rates = self.images / elapsed, self.wait_s / elapsed
        self._reset()
        return rates


class History:
    """The run's own record: one JSON line per progress line, appended to ``history.jsonl`` in the run folder
    (``streamssl report`` draws it). Survives restarts: a resumed run appends.

    A record that cannot be written (disk full) is dropped, never raised: the record is for people, training
    must not stop for it. The log says so once when it starts and once, with the count, when writes work
    again; the line after a failed write starts on a new line, so a torn line stays one line (the reader
    skips it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = None
        self.dropped = 0  # records dropped in the current failure

    def write(self, stats: StepStats, **extra: float) -> None:
        record = {"time": round(time.time(), 3), "step": stats.step, "loss": stats.loss, "lr": stats.lr,
                  **stats.diagnostics, **extra}
        self.event(record)

    def event(self, record: dict[str, Any]) -> None:
        line = json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}) + "\n"
        try:
            if self._file is None:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - kept open for the run
                if self.dropped:
                    line = "\n" + line  # whatever a failed write left of its line ends here
            self._file.write(line)
        except OSError as exc:
            if not self.dropped:
                log.warning("history %s: %s; its records are dropped until it can be written again", self.path,
                            exc.strerror or exc)
            self.dropped += 1
            self._discard()
            return
        if self.dropped:
            log.warning("history %s: written again; %d records were dropped", self.path, self.dropped)
            self.dropped = 0

    def _discard(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # closing flushes what is buffered, which may fail again
                self._file.close()
            self._file = None

    def close(self) -> None:
        self._discard()


__all__ = ["History", "ProgressWindow", "format_progress"]
