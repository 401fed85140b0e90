"""Shard URLs, forever: the first stage of the flow (source -> samples -> augment -> learner).

A *source* is an unbounded generator of WebDataset shard URLs plus the little state needed not to read a
finished shard twice after a restart. Three kinds, chosen by ``make_source`` from ``SourceConfig.urls``:

- ``PatternSource``: a glob or brace pattern (``shards/{000000..000999}.tar``, expanded with ``braceexpand``
  as webdataset does, then ``glob``) or a plain list of URLs; optionally cycled, reshuffled each pass.
- ``FolderSource``: a folder followed for new ``*.tar`` shards, taking only complete files.
- ``RedisStreamSource`` (redis_source.py): a Redis stream that producers XADD shard URLs to
  (``publish_urls``), read through a consumer group; a shard is XACKed only when all its samples were
  consumed, and shards left pending by a dead learner are reclaimed with XAUTOCLAIM. Delivery is at-least-once.

Every source has the same small interface (``ShardSource``): iterate it for URLs (and ``None`` each time a
poll found nothing new: an *idle tick* that lets the sample stream drain its shuffle buffer instead of
holding samples and their shards' acks while the stream is quiet); call ``mark_done(url)``
when every sample of a shard has left the sample stream (samples.py does this); ``state_dict()`` /
``load_state_dict()`` carry a JSON-serialisable position for checkpoints; ``close()`` ends a waiting
generator from another thread.

``state_dict`` counts a URL that was handed out but not yet marked done as *open*: after
``load_state_dict`` the source does not hand it out again, because the sample stream's own state resumes
it mid-shard (see ``samples.SampleStream``). Both states must therefore be taken at the same moment, which
``SampleStream.state_dict`` does.

Shard URLs are allow-listed (``check_url``): local paths, ``file://``, ``http(s)://``; ``pipe:`` only when
``allow_pipe`` is set, because it runs a shell command and URLs may come from others through Redis.
Opening goes through webdataset's own opener, ``webdataset.gopen.gopen`` (``open_shard``).
"""

from __future__ import annotations

import glob
import logging
import os
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlparse

from webdataset.gopen import gopen as wds_gopen

from streamssl.config import SourceConfig
from streamssl.redis_client import NO_TLS, TLSFiles
from streamssl.stream.redis_source import RedisStreamSource
from streamssl.urls import REDIS_SCHEMES, SourceError, check_url, expand_braces, local_path, redact

log = logging.getLogger(__name__)

# Names a producer uses while it writes; such files are never read (write to one, then rename into place).
_PARTIAL_SUFFIXES = (".tmp", ".part")
_GLOB_CHARS = frozenset("*?[")

T = TypeVar("T")


# --------------------------------------------------------------------------------------------- scheme policy


def open_shard(url: str, *, allow_pipe: bool = False) -> IO[bytes]:
    """Open a shard for reading after ``check_url``, through webdataset's opener (``webdataset.gopen``).

    http(s) goes through webdataset's curl pipe; local paths and ``file://`` are plain files.
    """
    return wds_gopen(check_url(url, allow_pipe=allow_pipe), "rb")


# --------------------------------------------------------------------------------------------- interface


@runtime_checkable
class ShardSource(Protocol):
    """What every source offers. Iteration yields shard URLs, or None when a poll found nothing new (the
    source is idle); it waits ``poll_s`` between empty polls. A source that ends (a pattern read once)
    simply returns."""

    def __iter__(self) -> Iterator[str | None]: ...

    def mark_done(self, url: str) -> None:
        """Every sample of ``url`` was consumed: never hand it out again (XACK for Redis)."""

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-serialisable position."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; call before iterating."""

    def close(self) -> None:
        """Make a waiting iteration end (callable from another thread)."""


# --------------------------------------------------------------------------------------------- pattern


def expand_pattern(pattern: str) -> list[str]:
    """Brace-expand ``pattern`` (as webdataset does), then glob each local part that has glob characters.

    Remote URLs and plain local names are kept as given, whether or not the file exists yet: a missing
    shard is counted as a ``shard_error`` when it is read, not here.
    """
    out: list[str] = []
    for part in expand_braces(pattern):  # SourceError for unbalanced braces or a pattern too large
        scheme = urlparse(part).scheme.lower()
        if scheme in ("", "file") and not part.startswith("pipe:") and _GLOB_CHARS & set(part):
            out += sorted(glob.glob(local_path(part)))
        else:
            out.append(part)
    return out


class PatternSource:
    """Shards from brace / glob patterns or plain URLs, in passes; cycled passes are reshuffled.

    Pass ``p`` of a cycled source is the expanded list shuffled with ``random.Random(seed + p)``, so every
    rank and every restart agrees on the order; a source that does not cycle reads the list once, in the
    given order, and ends. With ``world_size > 1``, rank ``r`` takes every ``world_size``-th shard of each
    pass (disjoint across ranks). Patterns are expanded once, at construction: follow a folder
    (``FolderSource``) to see shards that appear later.

    State: ``{"pass": p, "next": i}``, the position of the next URL to hand out. URLs handed out before it
    are either done or resumed by the sample stream, so nothing more is needed.
    """

    def __init__(self, patterns: Iterable[str], *, cycle: bool = True, seed: int = 0,
                 allow_pipe: bool = False, rank: int = 0, world_size: int = 1) -> None:
        patterns = tuple(patterns)
        urls = [url for pattern in patterns for url in expand_pattern(pattern)]
        for url in urls:
            check_url(url, allow_pipe=allow_pipe)
        if not urls:
            raise SourceError(f"shard patterns {list(patterns)!r} match no shard")
        local = [u for u in urls if urlparse(u).scheme.lower() in ("", "file") and not u.startswith("pipe:")]
        if len(local) == len(urls) and not any(os.path.exists(local_path(u)) for u in local):
            # Cycling over shards that all fail would spin on errors: refuse at once instead.
            raise SourceError(f"shard patterns {list(patterns)!r}: none of the {len(urls)} shards exists")
        if not 0 <= rank < world_size:
            raise SourceError(f"rank {rank} out of range for world size {world_size}")
        if len(urls) < world_size:
            raise SourceError(f"{len(urls)} shards cannot be split across {world_size} ranks")
        self.urls = urls
        self.cycle = cycle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._pass = 0
        self._next = 0
        self._closed = threading.Event()

    def describe(self) -> str:
        more = ", ..." if len(self.urls) > 2 else ""
        return f"{len(self.urls)} shards of {', '.join(map(redact, self.urls[:2]))}{more}"

    def pass_order(self, pass_index: int) -> list[str]:
        """The URLs this rank reads in pass ``pass_index``."""
        order = list(self.urls)
        if self.cycle:
            random.Random(self.seed + pass_index).shuffle(order)
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[str | None]:
        while not self._closed.is_set():
            order = self.pass_order(self._pass)
            while self._next < len(order):
                if self._closed.is_set():
                    return
                url = order[self._next]
                self._next += 1
                yield url
            if not self.cycle:
                return
            self._pass += 1
            self._next = 0

    def mark_done(self, url: str) -> None:
        """Nothing to record: the position in the pass already says what was handed out."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "pattern", "pass": self._pass, "next": self._next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pass = int(state.get("pass", 0))
        self._next = int(state.get("next", 0))

    def close(self) -> None:
        self._closed.set()


# --------------------------------------------------------------------------------------------- folder


class FolderSource:
    """Follow a folder: hand out each complete ``*.tar`` once, oldest first, polling every ``poll_s``.

    A file counts as complete when it could not be one still being written:

    - names a writer uses while writing are never read: starting with ``.``, ending in ``.tmp`` / ``.part``
      (they do not end in ``.tar``). Writing to such a name, then renaming into place, is the safe protocol.
    - a ``*.tar`` is taken once its size and mtime have not changed for ``settle_s``: either its mtime is at
      least ``settle_s`` old, or this follower saw the same size and mtime for ``settle_s``. With
      ``settle_s = 0`` every visible ``*.tar`` is taken at once (producers that rename need no more).

    Only the folder's own entries are followed, not sub-folders. With ``world_size > 1`` a shard goes to the
    rank chosen by a stable hash of its name.

    State: ``{"done": [names], "open": [names]}``. Names, not paths, so the folder may move. ``done`` is
    pruned to the names still present in the folder, so it stays as small as the folder: delete consumed
    shards and the state shrinks with them (a deleted name that reappears is a new shard and is read).
    """

    def __init__(self, folder: str | os.PathLike[str], *, poll_s: float = 2.0, settle_s: float = 5.0,
                 rank: int = 0, world_size: int = 1,
                 clock: Callable[[], float] = time.time) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"shard folder {str(folder)!r}: not a directory")
        self.poll_s = poll_s
        self.settle_s = settle_s
        self.rank = rank
        self.world_size = world_size
        self._clock = clock
        self._done: set[str] = set()
        self._open: set[str] = set()
        self._present: set[str] = set()
        # name -> ((size, mtime_ns), monotonic time first seen with that signature)
        self._seen: dict[str, tuple[tuple[int, int], float]] = {}
        self._missing = False  # the folder could not be listed at the last look
        self._closed = threading.Event()

    def describe(self) -> str:
        return f"*.tar in {self.folder}"

    def _mine(self, name: str) -> bool:
        if self.world_size == 1:
            return True
        # A stable hash: Python's hash() of a str changes between processes.
        return zlib.crc32(name.encode()) % self.world_size == self.rank

    def _settled(self, name: str, size: int, mtime_ns: int) -> bool:
        if self.settle_s <= 0:
            return True
        now_mono = time.monotonic()
        signature = (size, mtime_ns)
        previous = self._seen.get(name)
        if previous is None or previous[0] != signature:
            self._seen[name] = (signature, now_mono)
            first_seen = now_mono
        else:
            first_seen = previous[1]
        unchanged_for = max(self._clock() - mtime_ns / 1e9, now_mono - first_seen)
        return unchanged_for >= self.settle_s

    def scan(self) -> list[str]:
        """One look at the folder: the complete shards not yet handed out, oldest first."""
        ready: list[tuple[int, str]] = []
        present: set[str] = set()
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:  # folder unmounted or removed: keep following, say so once
            if not self._missing:
                log.warning("shard folder %s: %s; following it until it is back (shards read before stay done)",
                            self.folder, exc.strerror or exc)
                self._missing = True
            return []
        if self._missing:
            log.warning("shard folder %s is back", self.folder)
            self._missing = False
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.endswith(_PARTIAL_SUFFIXES) or not name.endswith(".tar"):
                continue
            present.add(name)
            if name in self._done or name in self._open or not self._mine(name):
                continue
            try:
                st = entry.stat()
            except OSError:  # vanished between listing and stat
                continue
            if not entry.is_file():
                continue
            if self._settled(name, st.st_size, st.st_mtime_ns):
                ready.append((st.st_mtime_ns, name))
        self._present = present
        self._seen = {k: v for k, v in self._seen.items() if k in present}
        return [name for _, name in sorted(ready)]

    def __iter__(self) -> Iterator[str | None]:
        while not self._closed.is_set():
            found = False
            for name in self.scan():
                if self._closed.is_set():
                    return
                if name in self._open or name in self._done:
                    continue
                self._open.add(name)
                self._seen.pop(name, None)
                found = True
                yield str(self.folder / name)
            if not found:
                yield None  # idle tick
                self._closed.wait(self.poll_s)

    def _name(self, url: str) -> str:
        return Path(url).name

    def mark_done(self, url: str) -> None:
        name = self._name(url)
        self._open.discard(name)
        self._done.add(name)

    def state_dict(self) -> dict[str, Any]:
        done = self._done & self._present if self._present else set(self._done)
        return {"kind": "folder", "done": sorted(done), "open": sorted(self._open)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._done = set(state.get("done", ()))
        self._open = set(state.get("open", ()))

    def close(self) -> None:
        self._closed.set()


# --------------------------------------------------------------------------------------------- factory


def make_source(cfg: SourceConfig, *, rank: int = 0, world_size: int = 1, tls: TLSFiles = NO_TLS,
                ) -> ShardSource:
    """Choose the source from ``cfg.urls``: one ``redis://`` / ``rediss://`` URL -> ``RedisStreamSource``;
    one existing directory -> ``FolderSource``; otherwise patterns and URLs -> ``PatternSource``.

    Raises ``SourceError`` for an empty ``cfg.urls`` (the caller supplies the embedded demo stream), for a
    Redis URL or folder mixed with other entries, and for a refused scheme in a pattern list.
    """
    urls = tuple(cfg.urls)
    if not urls:
        raise SourceError("source.urls is empty: give shard patterns, a folder or a redis:// URL")
    redis_urls = [u for u in urls if u.startswith(REDIS_SCHEMES)]
    if redis_urls:
        if len(urls) != 1:
            raise SourceError(f"source.urls {list(urls)!r}: a Redis stream must be the only source")
        return RedisStreamSource(redis_urls[0], stream_key=cfg.stream_key, group=cfg.group,
                                 consumer=cfg.consumer, poll_s=cfg.poll_s, claim_idle_s=cfg.claim_idle_s, tls=tls)
    folders = [u for u in urls if os.path.isdir(u)]
    if folders:
        if len(urls) != 1:
            raise SourceError(f"source.urls {list(urls)!r}: a followed folder must be the only source")
        return FolderSource(folders[0], poll_s=cfg.poll_s, settle_s=cfg.settle_s, rank=rank,
                            world_size=world_size)
    return PatternSource(urls, cycle=cfg.cycle, seed=cfg.seed, allow_pipe=cfg.allow_pipe, rank=rank,
                         world_size=world_size)


__all__ = ["FolderSource", "PatternSource", "RedisStreamSource", "ShardSource", "SourceError", "check_url",
           "expand_pattern", "make_source", "open_shard"]
