"""The Redis ingest stream: producers announce shard URLs (``publish_urls``, ``streamssl ingest``), learners
read them through a consumer group (``RedisStreamSource``, one of the sources of source.py), at least once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlparse

import redis

from streamssl.errors import RuntimeFailure
from streamssl.redis_client import NO_TLS, TLSFiles, auth_hint, connect, is_auth_error
from streamssl.stream.backoff import RateLimitedLog
from streamssl.urls import SourceError, check_url, local_path, redact

log = logging.getLogger("streamssl.stream.source")  # one logger for the stage: operators filter on it
_entry_log = RateLimitedLog(log, limit=20, interval_s=60.0)  # a producer writing junk must not flood the log

DEFAULT_STREAM_KEY = "streamssl:shards"
T = TypeVar("T")


def redis_client(redis_url: str, *, socket_timeout_s: float | None = None, tls: TLSFiles = NO_TLS,
                 ) -> redis.Redis:
    """A client of the ingest stream: ``redis_client.connect`` with text replies. Bytes that are not UTF-8 (a
    producer's junk) decode with U+FFFD in their place instead of raising in the middle of a read: such an
    entry is then a URL nobody can open, skipped and counted like any other."""
    return connect(redis_url, what="Redis URL", socket_timeout_s=socket_timeout_s, tls=tls, decode_responses=True,
                   encoding_errors="replace")


def publish_urls(redis_url: str, urls: list[str], *, stream_key: str = DEFAULT_STREAM_KEY,
                 tls: TLSFiles = NO_TLS, allow_pipe: bool = False) -> list[str]:
    """Producer side: XADD each shard URL (field ``url``) to ``stream_key``; return the entry ids in order.

    Every URL is checked first, as consumers check it (scheme; a local path must be an existing file), so a
    mistyped URL is refused here instead of being counted and skipped by every learner. The stream is not
    trimmed here: trimming could drop shards no learner has read.
    """
    for url in urls:
        check_url(url, allow_pipe=allow_pipe)
        if urlparse(url).scheme.lower() in ("", "file") and not os.path.isfile(local_path(url)):
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
        self.n_skipped_entries = 0  # entries without a "url" field: acknowledged, never handed out

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
                    self.n_skipped_entries += 1
                    _entry_log.warning("redis %s: entry %s has no 'url' field; acknowledged and skipped",
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



__all__ = ["DEFAULT_STREAM_KEY", "RedisAuthError", "RedisStreamSource", "SourceUnavailable", "publish_urls",
           "redis_client"]
