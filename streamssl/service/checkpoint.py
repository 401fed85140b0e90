"""Checkpoints: everything needed to resume mid-stream, written atomically, loaded without running code.

A checkpoint is one ``torch.save`` file holding plain containers and tensors only: the learner state (model,
optimizer, queue, step), the RNG states, the stream position, the resolved configuration and counters. It is
written to a temporary file in the same folder, fsynced, then renamed over its final name, so a crash (even
``kill -9``) mid-write leaves the previous checkpoints intact; the newest ``keep`` are kept.

Loading verifies before it trusts: the file must be a complete zip archive whose every member matches the
CRC-32 checksum written with it (``zipfile.testzip``: a flipped or overwritten byte anywhere is caught),
then ``torch.load(weights_only=True)`` reads it, so a tampered file cannot execute code. A checkpoint that
fails any check is reported with the reason and the next older one is tried.

Names carry a sequence number, ``ckpt-{n:012d}.pt``, that only grows: ``n`` is the learner's step, or one
more than the newest checkpoint's when the step went back (a collapse rollback). Newest is therefore always
the last written, and pruning never removes the checkpoint just written.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamssl.atomic import write_atomic
from streamssl.errors import RuntimeFailure, UsageError

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")
log = logging.getLogger("streamssl.service.checkpoint")


class CheckpointError(UsageError, RuntimeError):
    """A file that is no usable checkpoint: missing, damaged, of an unknown format, or written for another
    model (exit code 2: give another checkpoint or configuration)."""


class CheckpointWriteError(RuntimeFailure, OSError):
    """A checkpoint could not be written (disk full, permissions, the folder gone)."""


def verify(path: str | os.PathLike[str]) -> None:
    """Raise ``CheckpointError`` unless ``path`` is a complete zip archive whose members match their CRC-32."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file" if not path.exists() else f"{path}: not a file")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path}: not a complete checkpoint ({exc}): cut short, overwritten, or not "
                              "written by streamssl") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: damaged: member {bad} does not match its checksum (the file changed "
                              "after it was written)")


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify, then load one checkpoint file with ``weights_only=True``. Raises ``CheckpointError`` saying why not."""
    verify(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # an archive with the right checksums but content torch refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            first = "it holds objects other than tensors and plain containers, which are never loaded"
        raise CheckpointError(f"{path}: not a loadable streamssl checkpoint: {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a streamssl checkpoint of format {FORMAT}")
    state["path"] = str(path)
    return state


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

    def prepare(self) -> None:
        """Create the folder, check that a file can be written in it, and remove temporary files a killed
        writer left. Raises ``UsageError`` naming the folder when it cannot hold checkpoints."""
        where = f"checkpoint.dir {str(self.folder)!r}"
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"{where}: is a file, not a folder; name a folder for the run's checkpoints")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=self.folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise UsageError(f"{where}: cannot write there ({exc.strerror or exc}); give a folder this user can "
                             "write (checkpoints, the local store and the history go there)") from None
        for stale in self.folder.glob(".ckpt-*.tmp"):
            stale.unlink(missing_ok=True)

    def paths(self) -> list[Path]:
        """Checkpoints present, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=_sequence)

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``state`` as the checkpoint of ``step`` atomically, then prune to ``keep``. Returns its path.

        Raises ``CheckpointWriteError`` when the file cannot be written; the previous checkpoints are intact.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointWriteError(f"checkpoint of step {step} not written: {self.folder}: "
                                       f"{exc.strerror or exc}") from exc
        existing = self.paths()
        sequence = max(step, _sequence(existing[-1]) + 1) if existing else step
        final = self.folder / f"ckpt-{sequence:012d}.pt"
        payload = {"format": FORMAT, "step": step, "sequence": sequence, "saved_at": time.time(), **state}
        try:  # a hidden .ckpt-*.tmp beside it while written (prepare removes those a killed writer left)
            write_atomic(final, lambda f: _save(payload, f), sync_folder=True)
        except OSError as exc:
            raise CheckpointWriteError(f"checkpoint of step {step} not written to {self.folder}: "
                                       f"{exc.strerror or exc}") from exc
        for old in self.paths()[:-self.keep]:
            old.unlink(missing_ok=True)
        return final

    def load(self, path: str | os.PathLike[str] | None = None, *, map_location: str | torch.device = "cpu",
             ) -> dict[str, Any] | None:
        """Load ``path``, or the newest checkpoint that passes every check (None when there is none).

        Without ``path``, a checkpoint that fails is logged with the reason and the next older one tried.
        """
        if path is not None:
            return load_checkpoint(path, map_location=map_location)
        for candidate in reversed(self.paths()):
            try:
                return load_checkpoint(candidate, map_location=map_location)
            except CheckpointError as exc:
                log.error("%s; trying the one before it", exc)
        return None


class _KeepsWriteErrors:
    """A file whose failed writes ``torch.save`` cannot hide: its zip writer turns a write that raised (disk
    full) into ``RuntimeError('... unexpected pos ...')``; the ``OSError`` is kept here to be raised instead."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _save(payload: dict[str, Any], f: Any) -> None:
    sink = _KeepsWriteErrors(f)
    try:
        torch.save(payload, sink)
    except RuntimeError:
        if sink.error is not None:
            raise sink.error from None
        raise


def _sequence(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))  # type: ignore[union-attr]


def load_trunk(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trunk of a streamssl checkpoint (weights only, no code run) and the run's configuration dict."""
    from streamssl.config import SECTIONS, LearnerConfig, ModelConfig
    from streamssl.learner.methods import make_method

    state = load_checkpoint(checkpoint, map_location="cpu")
    try:
        config = state["config"]

        def section(cls: type, name: str) -> Any:
            fields = cls.__dataclass_fields__
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config[name].items() if k in fields})

        # the method the checkpoint was trained with (SwAV before there were others), built as it was
        learner = section(LearnerConfig, "learner")
        settings = section(SECTIONS[learner.method], learner.method) if learner.method in config else None
        model = make_method(section(ModelConfig, "model"), learner, device=torch.device("cpu"), settings=settings)
        model.load_state_dict(state["learner"]["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{checkpoint}: its model cannot be rebuilt ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return model.trunk.to(device).eval(), config
