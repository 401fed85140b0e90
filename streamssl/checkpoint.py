"""Checkpoints: everything needed to resume mid-stream, written atomically, loaded without running code.

A checkpoint is one ``torch.save`` file holding plain containers and tensors only: the learner state (model,
optimizer, queue, step), the RNG states, the stream position, the resolved configuration and counters. It is
written to a temporary file in the same folder, fsynced, then renamed over its final name, so a crash (even
``kill -9``) mid-write leaves the previous checkpoints intact; the newest ``keep`` are kept. Loading uses
``torch.load(weights_only=True)``: a tampered file cannot execute code. A checkpoint that fails to load is
reported and the next older one is tried.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")
log = logging.getLogger("streamssl.checkpoint")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one of an unknown format."""


def rng_state() -> dict[str, Any]:
    """The RNG states that shape training: Python's, torch's CPU and CUDA generators."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Writes, lists, prunes and loads the checkpoints of one run folder.

    Args:
        folder: where checkpoints live (created if missing).
        keep: how many of the newest to keep.
    """

    def __init__(self, folder: str | os.PathLike[str], *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.folder = Path(folder)
        self.keep = keep
        self.folder.mkdir(parents=True, exist_ok=True)

    def paths(self) -> list[Path]:
        """Checkpoints present, oldest first."""
        found = [p for p in self.folder.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``state`` as the checkpoint of ``step`` atomically, then prune to ``keep``. Returns its path."""
        final = self.folder / f"ckpt-{step:012d}.pt"
        payload = {"format": FORMAT, "step": step, "saved_at": time.time(), **state}
        fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.folder)
        for old in self.paths()[:-self.keep]:
            old.unlink(missing_ok=True)
        return final

    def load(self, path: str | os.PathLike[str] | None = None, *, map_location: str | torch.device = "cpu",
             ) -> dict[str, Any] | None:
        """Load ``path``, or the newest loadable checkpoint (None when there is none)."""
        candidates = [Path(path)] if path is not None else list(reversed(self.paths()))
        for candidate in candidates:
            try:
                state = torch.load(candidate, map_location=map_location, weights_only=True)
            except Exception as exc:  # truncated or tampered file: try the next older one
                if path is not None:
                    raise CheckpointError(f"{candidate}: cannot be loaded safely: {exc}") from exc
                log.error("checkpoint %s cannot be loaded (%s); trying an older one", candidate.name, exc)
                continue
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise CheckpointError(f"{candidate}: not a streamssl checkpoint of format {FORMAT}")
            state["path"] = str(candidate)
            return state
        return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
