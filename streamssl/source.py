"""Shard URLs, forever: the first stage of the flow (source -> samples -> augment -> learner).

A *source* is an unbounded generator of WebDataset shard URLs plus the little state needed not to read a
finished shard twice after a restart. Three kinds, chosen by ``make_source`` from ``SourceConfig.urls``:

- ``PatternSource``: a glob or brace pattern (``shards/{000000..000999}.tar``, expanded with ``braceexpand``
  as webdataset does, then ``glob``) or a plain list of URLs; optionally cycled, reshuffled each pass.
- ``FolderSource``: a folder followed for new ``*.tar`` shards, taking only complete files.
- ``RedisStreamSource``: a Redis stream that producers XADD shard URLs to (``publish_urls``), read through
  a consumer group; a shard is XACKed only when all its samples were consumed, and shards left pending by a
  dead learner are reclaimed with XAUTOCLAIM. Delivery is at-least-once.

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
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import redis
from webdataset.gopen import gopen as wds_gopen

from streamssl.config import SourceConfig
from streamssl.errors import RuntimeFailure
from streamssl.redis_client import NO_TLS, TLSFiles, auth_hint, connect, is_auth_error
from streamssl.urls import REDIS_SCHEMES, SourceError, check_url, redact

log = logging.getLogger(__name__)

DEFAULT_STREAM_KEY = "streamssl:shards"
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


def _local_path(url: str) -> str:
    """The local path of a plain path or ``file://`` URL (as webdataset's opener reads it)."""
    return url2pathname(urlparse(url).path) if url.lower().startswith("file:") else url


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
    for part in braceexpand.braceexpand(pattern):
        scheme = urlparse(part).scheme.lower()
        if scheme in ("", "file") and not part.startswith("pipe:") and _GLOB_CHARS & set(part):
            out += sorted(glob.glob(_local_path(part)))
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
        if len(local) == len(urls) and not any(os.path.exists(_local_path(u)) for u in local):
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
        return f"{len(self.urls)} shards of {', '.join(self.urls[:2])}{', ...' if len(self.urls) > 2 else ''}"

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
        except OSError as exc:  # folder briefly unmounted or removed: keep following
            log.warning("shard folder %s: %s", self.folder, exc)
            return []
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


# --------------------------------------------------------------------------------------------- redis


def redis_client(redis_url: str, *, socket_timeout_s: float | None = None, tls: TLSFiles = NO_TLS,
                 ) -> redis.Redis:
    """A client of the ingest stream: ``redis_client.connect`` with text replies."""
    return connect(redis_url, what="Redis URL", socket_timeout_s=socket_timeout_s, tls=tls, decode_responses=True)


def publish_urls(redis_url: str, urls: list[str], *, stream_key: str = DEFAULT_STREAM_KEY,
                 tls: TLSFiles = NO_TLS, allow_pipe: bool = False) -> list[str]:
    """Producer side: XADD each shard URL (field ``url``) to ``stream_key``; return the entry ids in order.

    Every URL is checked first, as consumers check it (scheme; a local path must be an existing file), so a
    mistyped URL is refused here instead of being counted and skipped by every learner. The stream is not
    trimmed here: trimming could drop shards no learner has read.
    """
    for url in urls:
        check_url(url, allow_pipe=allow_pipe)
        if urlparse(url).scheme.lower() in ("", "file") and not os.path.isfile(_local_path(url)):
            raise SourceError(f"shard URL {url!r}: no such file here (learners read local paths on their own "
                              "machines: publish paths they can see, or http(s) URLs)")
    client = redis_client(redis_url, tls=tls)
    try:
        pipe = client.pipeline(transaction=True)
        for url in urls:
            pipe.xadd(stream_key, {"url": url})
        return [str(entry_id) for entry_id in pipe.execute()]
    except redis.RedisError as exc:
        if is_auth_error(exc):
            raise RedisAuthError(f"{auth_hint(redis_url)} ({exc})") from None
        raise SourceUnavailable(f"Redis at {redact(redis_url)} unreachable: {exc}; is redis-server running "
                                "there, and is the URL right?") from None
    finally:
        client.close()


class RedisAuthError(SourceError):
    """The ingest stream's Redis refused our credentials: a configuration error, never retried."""


class SourceUnavailable(RuntimeFailure):
    """The ingest stream's Redis does not answer (``streamssl ingest``; learners retry instead)."""


_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


class RedisStreamSource:
    """Shard URLs from a Redis stream through a consumer group; at-least-once.

    Each URL handed out is pending in the group (on this consumer) until ``mark_done`` XACKs it, which the
    sample stream calls once every sample of the shard was consumed. Before reading new entries the source
    takes, in order: its own pending entries (a restart under the same consumer name), then entries idle on
    any consumer for ``claim_idle_s`` (XAUTOCLAIM: a learner that died mid-shard), then new ones, one at a
    time so that idle learners get shards too. Each read also re-claims this consumer's open entries, which
    resets their idle time: a shard is reclaimed only when its learner stopped asking for shards.

    Redis going away never ends the stream: every call is retried with exponential backoff (capped at
    ``max_backoff_s``); an XACK that fails is kept and retried on the next call; a group lost with a Redis
    restart is created again. The group is created at id 0, so URLs published before the first learner
    started are read too.

    State: ``{"open": [[url, entry_id], ...]}``: entries handed out and not yet done. After
    ``load_state_dict`` they are claimed by this consumer (the name may differ after a restart) and not
    handed out again: the sample stream resumes them.
    """

    def __init__(self, redis_url: str, *, stream_key: str = DEFAULT_STREAM_KEY, group: str = "learners",
                 consumer: str = "", poll_s: float = 2.0, claim_idle_s: float = 600.0,
                 max_backoff_s: float = 5.0, tls: TLSFiles = NO_TLS) -> None:
        self.redis_url = redis_url
        self.stream_key = stream_key
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.poll_s = poll_s
        self.claim_idle_s = claim_idle_s
        self.max_backoff_s = max_backoff_s
        # A blocking XREADGROUP waits poll_s: the socket must wait longer than that.
        self._client = redis_client(redis_url, socket_timeout_s=poll_s + 10.0, tls=tls)
        self._open: list[tuple[str, str]] = []  # (url, entry id), handed out, not done
        self._unacked: list[str] = []  # done, XACK failed (Redis down): retried on the next call
        self._claim_cursor = "0-0"
        self._own_pending_read = False
        self._group_ready = False
        self._closed = threading.Event()
        self.n_reconnects = 0

    def describe(self) -> str:
        return f"shard URLs on Redis stream {self.stream_key} at {redact(self.redis_url)}"

    # ------------------------------------------------------------------ plumbing

    def _ensure_group(self) -> None:
        try:
            self._client.xgroup_create(self.stream_key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True
        self._claim_cursor = "0-0"  # a recreated group's entries may sort before the old cursor

    def _call(self, op: Callable[[], T]) -> T | None:
        """Run ``op`` until it succeeds; back off while Redis is away. None only once closed."""
        delay = 0.05
        failing = False
        while not self._closed.is_set():
            try:
                if not self._group_ready:
                    self._ensure_group()
                self._flush_acks()
                result = op()
                if failing:
                    log.info("redis %s: reconnected", self.stream_key)
                return result
            except redis.RedisError as exc:
                if is_auth_error(exc):  # a wrong password stays wrong: stop with the reason, never spin on it
                    raise RedisAuthError(f"{auth_hint(self.redis_url)} ({exc}); set it in source.urls") from None
                if isinstance(exc, redis.ResponseError):
                    if "NOGROUP" not in str(exc):
                        raise
                    self._group_ready = False  # stream or group deleted, or Redis restarted empty
                    self._closed.wait(0.01)
                    continue
                if not isinstance(exc, _TRANSIENT):
                    raise
                if not failing:
                    log.warning("redis %s: %s; retrying with backoff", self.stream_key, exc)
                    failing = True
                    self.n_reconnects += 1
                self._group_ready = False  # a restarted server may have lost the group
                self._closed.wait(delay)
                delay = min(delay * 2, self.max_backoff_s)
        return None

    def _flush_acks(self) -> None:
        if self._unacked:
            self._client.xack(self.stream_key, self.group, *self._unacked)
            self._unacked = []

    def _held_ids(self) -> set[str]:
        return {entry_id for _, entry_id in self._open}

    def _keepalive(self) -> None:
        ids = [entry_id for _, entry_id in self._open]
        if ids:
            self._client.xclaim(self.stream_key, self.group, self.consumer, 0, ids, justid=True)

    def _next_entries(self) -> list[tuple[str, dict[str, str]]]:
        """One round: own pending (first round only), then reclaimed idle entries, then one new entry."""
        self._keepalive()
        if not self._own_pending_read:
            reply = self._client.xreadgroup(self.group, self.consumer, {self.stream_key: "0"})
            self._own_pending_read = True
            entries = reply[0][1] if reply else []
            held = self._held_ids()
            entries = [(i, f) for i, f in entries if i not in held]
            if entries:
                return entries
        min_idle_ms = int(self.claim_idle_s * 1000)
        claimed = self._client.xautoclaim(self.stream_key, self.group, self.consumer, min_idle_ms,
                                          start_id=self._claim_cursor, count=1)
        self._claim_cursor = str(claimed[0])
        held = self._held_ids()
        entries = [(i, f) for i, f in claimed[1] if i not in held]
        if entries:
            return entries
        reply = self._client.xreadgroup(self.group, self.consumer, {self.stream_key: ">"}, count=1,
                                        block=max(1, int(self.poll_s * 1000)))
        return reply[0][1] if reply else []

    # ------------------------------------------------------------------ ShardSource

    def __iter__(self) -> Iterator[str | None]:
        while not self._closed.is_set():
            entries = self._call(self._next_entries)
            if entries is None:
                return
            if not entries:
                yield None  # idle tick: XREADGROUP waited poll_s for nothing
            for entry_id, fields in entries:
                url = (fields or {}).get("url")
                if not url:
                    # Not ours to read and never will be: ack so it is not redelivered forever.
                    log.warning("redis %s: entry %s has no 'url' field; acknowledged and skipped",
                                self.stream_key, entry_id)
                    self._unacked.append(entry_id)
                    continue
                self._open.append((url, entry_id))
                yield url

    def mark_done(self, url: str) -> None:
        """XACK the oldest open entry for ``url``. Never raises: a failed XACK is retried later."""
        for k, (open_url, entry_id) in enumerate(self._open):
            if open_url == url:
                del self._open[k]
                self._unacked.append(entry_id)
                break
        else:
            return
        try:
            self._flush_acks()
        except _TRANSIENT as exc:
            log.warning("redis %s: XACK deferred: %s", self.stream_key, exc)
        except redis.ResponseError as exc:  # NOGROUP after a Redis restart: nothing left to ack
            log.warning("redis %s: XACK dropped: %s", self.stream_key, exc)
            self._unacked = []

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "redis", "open": [[url, entry_id] for url, entry_id in self._open]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._open = [(str(url), str(entry_id)) for url, entry_id in state.get("open", ())]
        try:  # claim them at once: the sample stream re-reads them before it asks for new shards
            self._keepalive()
        except (*_TRANSIENT, redis.ResponseError) as exc:
            log.warning("redis %s: could not claim resumed shards yet: %s", self.stream_key, exc)

    def close(self) -> None:
        self._closed.set()

    def pending_count(self) -> int | None:
        """Entries of the group delivered and not acknowledged (all consumers); None when Redis is away."""
        try:
            return int(self._client.xpending(self.stream_key, self.group)["pending"])
        except (*_TRANSIENT, redis.ResponseError):
            return None


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


__all__ = [
    "DEFAULT_STREAM_KEY", "FolderSource", "PatternSource", "RedisAuthError", "RedisStreamSource", "ShardSource",
    "SourceError", "SourceUnavailable",
    "check_url", "expand_pattern", "make_source", "open_shard", "publish_urls", "redis_client",
]
