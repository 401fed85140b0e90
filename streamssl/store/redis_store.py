"""``RedisPrototypeStore``: the prototype store in Redis (the key layout is in the package docstring)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamssl.redis_client import TLSFiles, connect, is_auth_error
from streamssl.store.contract import (
    DTYPE,
    CorruptPrototypes,
    InfoValue,
    PrototypeMeta,
    StatusMixin,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
    UnknownVersion,
    VersionConflict,
    check_info,
    checksum,
    decode,
    default_writer_id,
    encode,
    live_learners,
    meta_from_fields,
    parse_json_object,
)
from streamssl.urls import check_redis_url, redact

log = logging.getLogger("streamssl.store")  # one logger for the store, whichever file it lives in

# --------------------------------------------------------------------------------------------- Redis


# KEYS[1] current hash, KEYS[2] history list.
# ARGV: expected version ("" = unconditional), archive key prefix, history length, then the fields.
_WRITE_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0') or 0
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= cur then
  return {0, cur}
end
local keep = tonumber(ARGV[3])
-- versions only grow, even if the current hash was deleted by hand and archives remain
local top = tonumber(redis.call('LINDEX', KEYS[2], 0) or '0') or 0
local new = math.max(cur, top) + 1
if redis.call('EXISTS', KEYS[1]) == 1 then
  if keep > 0 and cur > top then
    redis.call('RENAME', KEYS[1], ARGV[2] .. cur)
    redis.call('LPUSH', KEYS[2], cur)
  else
    redis.call('DEL', KEYS[1])
  end
end
local old = redis.call('LRANGE', KEYS[2], keep, -1)
for _, v in ipairs(old) do
  redis.call('DEL', ARGV[2] .. v)
end
if keep > 0 then
  redis.call('LTRIM', KEYS[2], 0, keep - 1)
else
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[1], 'version', new, 'data', ARGV[4], 'shape', ARGV[5], 'dtype', ARGV[6],
           'step', ARGV[7], 'written_at', ARGV[8], 'writer', ARGV[9], 'checksum', ARGV[10])
return {1, new}
"""

_META_FIELDS = ("version", "step", "shape", "dtype", "written_at", "writer", "checksum")


class RedisPrototypeStore(StatusMixin):
    """The prototype store in Redis (the key layout is in the package docstring, store/__init__.py).

    Args:
        url: ``redis://[[user]:password@]host:port/db`` or ``rediss://...`` for TLS.
        prefix: prefix of every key (``store.prefix``); two runs on one Redis need two prefixes.
        history: earlier versions kept besides the current one (0: none).
        writer: this writer's id in the metadata; ``host:pid`` by default.
        socket_timeout_s: connect and read timeout. Nothing waits longer than about twice this.
        tls_ca_file, tls_cert_file, tls_key_file: ``rediss://`` only: CA bundle, client certificate and key.

    Nothing connects here: a store down at start surfaces as ``StoreUnavailable`` on the first call.
    """

    def __init__(self, url: str, *, prefix: str = "streamssl", history: int = 20, writer: str | None = None,
                 socket_timeout_s: float = 2.0, tls_ca_file: str = "", tls_cert_file: str = "",
                 tls_key_file: str = "") -> None:
        check_redis_url(url, "store.url")
        if history < 0:
            raise ValueError(f"history must be >= 0, got {history}")
        if not prefix:
            raise ValueError("prefix must not be empty")
        self.location = redact(url)
        self.prefix = prefix
        self.history_len = history
        self.writer = writer or default_writer_id()
        self.key = f"{prefix}:prototypes"
        self.history_key = f"{prefix}:prototypes:history"
        self.archive_prefix = f"{prefix}:prototypes:v:"
        self.checkpoint_key = f"{prefix}:checkpoint"
        self.learner_prefix = f"{prefix}:learner:"
        self.learners_key = f"{prefix}:learners"
        # One quick retry: a pooled connection to a restarted server fails once, then reconnects.
        # Longer retry schedules belong to the BackgroundWriter, which never blocks training.
        self._client = connect(url, what="store.url", socket_timeout_s=socket_timeout_s,
                               connect_timeout_s=socket_timeout_s,
                               tls=TLSFiles(tls_ca_file, tls_cert_file, tls_key_file), retry=Retry(NoBackoff(), 1))
        self._write_script = self._client.register_script(_WRITE_LUA)

    @contextlib.contextmanager
    def _talking(self, what: str) -> Iterator[None]:
        """Translate redis-py errors into this module's, naming the (redacted) store and the operation."""
        try:
            yield
        except redis_errors.RedisError as exc:
            if is_auth_error(exc):
                raise StoreAuthError(f"Redis at {self.location} refused our credentials while {what}: {exc} "
                                     "(check the user and password in store.url)") from exc
            if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError):
                raise StoreUnavailable(f"Redis at {self.location} unreachable while {what}: {exc}") from exc
            raise StoreError(f"Redis at {self.location} failed while {what}: {exc}") from exc

    def write(self, prototypes: Any, step: int, *, expected_version: int | None) -> int:
        """Publish (K, D) prototypes taken at ``step``; return the new version.

        ``expected_version``: the version this writer last saw (0: the store is empty); a different current
        version raises ``VersionConflict`` and writes nothing. None writes unconditionally.
        """
        data, shape = encode(prototypes)
        fields = [data, json.dumps(list(shape)), DTYPE, str(int(step)), repr(time.time()), self.writer,
                  checksum(data)]
        args = ["" if expected_version is None else str(int(expected_version)), self.archive_prefix,
                str(self.history_len), *fields]
        with self._talking("writing prototypes"):
            ok, version = self._write_script(keys=[self.key, self.history_key], args=args)
        if not ok:
            raise VersionConflict(int(expected_version or 0), int(version), location=self.location)
        return int(version)

    def _fields(self, key: str, with_data: bool) -> dict[str, Any]:
        names = (*_META_FIELDS, "data") if with_data else _META_FIELDS
        with self._talking("reading prototypes"):
            values = self._client.hmget(key, names)
        out: dict[str, Any] = {}
        for name, value in zip(names, values, strict=True):
            if value is not None:
                out[name] = value if name == "data" else value.decode("utf-8", "replace")
        return out

    def _load(self, key: str) -> tuple[np.ndarray, PrototypeMeta] | None:
        fields = self._fields(key, with_data=True)
        if not fields:
            return None
        where = f"Redis {self.location} key {key}"
        meta = meta_from_fields(fields, where)
        if "data" not in fields:
            raise CorruptPrototypes(f"{where}: field 'data' is missing")
        return decode(fields["data"], meta, where), meta

    def read(self, version: int | None = None) -> tuple[np.ndarray, PrototypeMeta] | None:
        """The current prototypes (None if none were written yet), or those of an earlier ``version``."""
        if version is None:
            return self._load(self.key)
        # The current hash moves to its archive key atomically, so looking at the current one first cannot
        # miss a version that is being archived right now.
        current = self.meta()
        if current is not None and current.version == version:
            found = self._load(self.key)
            if found is not None and found[1].version == version:
                return found
        found = self._load(f"{self.archive_prefix}{int(version)}")
        if found is None:
            raise UnknownVersion(f"prototype version {version} is not in the store at {self.location} "
                                 f"(kept: {[m.version for m in self.history()]})")
        if found[1].version != version:
            raise CorruptPrototypes(f"Redis {self.location}: archive of version {version} says version "
                                    f"{found[1].version}")
        return found

    def meta(self) -> PrototypeMeta | None:
        fields = self._fields(self.key, with_data=False)
        return meta_from_fields(fields, f"Redis {self.location} key {self.key}") if fields else None

    def history(self) -> list[PrototypeMeta]:
        """Metadata of every readable version, newest first: the current one, then the earlier ones kept."""
        with self._talking("reading the prototype history"):
            pipe = self._client.pipeline(transaction=True)
            pipe.hmget(self.key, _META_FIELDS)
            pipe.lrange(self.history_key, 0, -1)
            current, versions = pipe.execute()
            pipe = self._client.pipeline(transaction=False)
            for v in versions:
                pipe.hmget(self.archive_prefix + v.decode(), _META_FIELDS)
            archived = pipe.execute()
        out = []
        for values in (current, *archived):
            fields = {n: v.decode("utf-8", "replace") for n, v in zip(_META_FIELDS, values, strict=True)
                      if v is not None}
            if not fields:  # pruned between the two round trips
                continue
            try:
                out.append(meta_from_fields(fields, f"Redis {self.location}"))
            except CorruptPrototypes as exc:
                log.warning("prototype history: skipping an unreadable entry: %s", exc)
        return out

    def heartbeat(self, learner_id: str, info: Mapping[str, InfoValue], ttl_s: float) -> None:
        """Say ``learner_id`` is alive for ``ttl_s`` seconds, with a few numbers (step, images/s, ...)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        now = time.time()
        body = json.dumps({"learner_id": learner_id, "info": check_info(info), "at": now, "ttl_s": float(ttl_s)})
        with self._talking("writing a heartbeat"):
            pipe = self._client.pipeline(transaction=True)
            pipe.set(self.learner_prefix + learner_id, body, px=max(1, round(ttl_s * 1000)))
            pipe.zadd(self.learners_key, {learner_id: now})
            # forget learners silent for a day (their keys expired long ago); a day of margin absorbs clock skew
            pipe.zremrangebyscore(self.learners_key, "-inf", now - 86400)
            pipe.execute()

    def learners(self) -> list[dict[str, Any]]:
        """Live learners (heartbeat not expired): learner_id, info, heartbeat_age_s, expires_in_s."""
        with self._talking("listing learners"):
            ids = self._client.zrange(self.learners_key, 0, -1)
            values = self._client.mget([self.learner_prefix.encode() + i for i in ids]) if ids else []
        return live_learners(v for v in values if v is not None)

    def record_checkpoint(self, info: Mapping[str, Any]) -> None:
        """Remember the last checkpoint written (path, step, time) for ``streamssl status``."""
        body = json.dumps(check_info(info) | {"recorded_at": time.time()})
        with self._talking("recording a checkpoint"):
            self._client.set(self.checkpoint_key, body)

    def last_checkpoint(self) -> dict[str, Any] | None:
        with self._talking("reading the last checkpoint"):
            raw = self._client.get(self.checkpoint_key)
        return parse_json_object(raw, f"Redis {self.location} key {self.checkpoint_key}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


