"""Atomic file writes: the one way streamssl writes a file that a reader may open while it is being written.

The bytes go to a hidden temporary file beside the final one (``.<name>.<random>.tmp``: hidden names and the
``.tmp`` suffix are what a followed folder and the checkpoint scan skip), are flushed and fsynced, and the
temporary file is renamed over the final name (``os.replace``, atomic on POSIX within one file system). A
reader sees the old file or the new one, never a partial one; a crash leaves at most a temporary file, and a
failed write removes its own. Shards (stream/pack.py), checkpoints (service/checkpoint.py) and the local
prototype store (store/local.py) all write through it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], object], *, durable: bool = True,
                 sync_folder: bool = False) -> Path:
    """Write ``path`` atomically: ``write(stream)`` fills a temporary file beside it, which then replaces it.

    ``durable``: fsync the file before the rename, so that the rename never exposes bytes that a power
    failure would lose. ``sync_folder``: also fsync the folder after the rename, so that the rename itself
    survives one (best effort: some platforms cannot open folders). Raises the ``OSError`` of a failed
    write after removing the temporary file; the final name is then untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_folder:
        fsync_folder(path.parent)
    return path


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so that renames and removals in it are on disk (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = ["fsync_folder", "write_atomic"]
