"""Prototype store: the shared, small, hot state of a run (DESIGN.md, "Prototype store").

A leaf of the flow. The daemon publishes the SwAV prototypes (K x D float32) here every ``store.every_steps``
steps, through a ``BackgroundWriter`` so that a slow or absent store never stalls training; a restarted or
second learner, ``streamssl status`` and any assignment service read them back. Learners also leave
heartbeats (a key with a TTL) and the last checkpoint they wrote.

Two implementations of one contract (``PrototypeStore``):

* ``RedisPrototypeStore`` (``redis://``, ``rediss://`` for TLS, AUTH from the URL). Key layout under
  ``prefix`` (``streamssl`` by default)::

      {prefix}:prototypes            hash: data (raw little-endian float32 bytes), shape ("[K, D]"), dtype
                                     ("<f4"), version, step, written_at (unix s), writer, checksum ("sha256:..")
      {prefix}:prototypes:v:{n}      an earlier version n, the same hash renamed (O(1), no copy)
      {prefix}:prototypes:history    list of the earlier versions kept, newest first, capped at ``history``
      {prefix}:learner:{learner_id}  JSON heartbeat, SET with PX = its TTL
      {prefix}:learners              sorted set: learner ids by last heartbeat (an index; the TTL key decides)
      {prefix}:checkpoint            JSON: the last checkpoint a learner recorded

  A write is one Lua script: compare-and-set on the version, archive the current hash under its version,
  trim the history, write the new hash. Readers see either the old or the new version, never a mix.
  The script names archive keys it derives itself, so Redis Cluster is not supported (one node or a
  primary with replicas is).

* ``LocalPrototypeStore`` (the embedded default when ``store.url`` is empty): one file per version,
  ``prototypes-v{n:012d}.bin`` = a magic line, a JSON header line (the same fields) and the raw bytes,
  written to a temp file then renamed; the current version is the highest file; a lock file serialises the
  compare-and-set between processes; ``heartbeat-*.json`` and ``last-checkpoint.json`` beside them.

Never pickle: arrays are raw float32 bytes, everything else JSON. ``read`` verifies the checksum, the dtype,
the shape and the byte length, and raises ``CorruptPrototypes`` on any mismatch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamssl.errors import StreamsslError
from streamssl.redis_client import TLSFiles, connect, is_auth_error
from streamssl.urls import check_redis_url, redact

try:  # POSIX: a real lock between processes sharing a local store
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from streamssl.config import StoreConfig

log = logging.getLogger("streamssl.store")

DTYPE = "<f4"  # the only dtype stored: little-endian float32, whatever the host byte order
redact_url = redact  # the name this module exported first
InfoValue = str | int | float


# --------------------------------------------------------------------------------------------- errors


class StoreError(StreamsslError):
    """Base of every error this module raises on purpose."""


class VersionConflict(StoreError):
    """``write(expected_version=...)`` found another version: someone else wrote in between."""

    def __init__(self, expected: int, actual: int, *, location: str = "") -> None:
        self.expected = expected
        self.actual = actual
        where = f" at {location}" if location else ""
        super().__init__(f"prototype store{where}: expected version {expected}, found {actual} "
                         "(another writer got there first; re-read and decide)")


class CorruptPrototypes(StoreError):
    """Stored prototypes fail a check: checksum, dtype, shape, byte length or a malformed field."""


class UnknownVersion(StoreError, LookupError):
    """``read(version=n)`` for a version that was never written or was pruned from the history."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (connection refused, timeout, TLS failure)."""


class StoreAuthError(StoreUnavailable):
    """The store refused our credentials (wrong or missing password, unknown user, missing ACL right).

    A configuration error (exit code 2): retrying with the same credentials cannot succeed."""

    exit_code = 2


# --------------------------------------------------------------------------------------------- contract


@dataclass(frozen=True)
class PrototypeMeta:
    """What is known about one stored version, without its data."""

    version: int
    step: int
    shape: tuple[int, int]  # (K, D)
    dtype: str
    written_at: float  # unix seconds, the writer's clock
    writer: str
    checksum: str  # "sha256:<hex>" of the raw bytes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


@runtime_checkable
class PrototypeStore(Protocol):
    """Versioned prototypes, learner heartbeats and the last checkpoint, shared by learners and readers.

    Errors: ``VersionConflict``, ``CorruptPrototypes``, ``UnknownVersion``, ``StoreUnavailable`` (and its
    ``StoreAuthError``), all ``StoreError``; a bad argument is a ``ValueError`` or ``TypeError``.
    """

    writer: str  # this process's id in the metadata it writes
    location: str  # where the store is, safe to print (no password)

    def write(self, prototypes: Any, step: int, *, expected_version: int | None) -> int:
        """Store (K, D) prototypes (numpy or torch, any float dtype, kept as float32) taken at ``step``.

        ``expected_version``: the current version the caller believes in (0 for an empty store); another
        current version raises ``VersionConflict`` and writes nothing. None: unconditional. Returns the new
        version (the previous one plus one). Non-finite values raise ``ValueError``.
        """
        ...

    def read(self, version: int | None = None) -> tuple[np.ndarray, PrototypeMeta] | None:
        """The current (K, D) float32 prototypes and their metadata, None if nothing was written; or those
        of an earlier ``version`` still in the history (``UnknownVersion`` otherwise). Checked: checksum,
        dtype, shape, byte length (``CorruptPrototypes``)."""
        ...

    def meta(self) -> PrototypeMeta | None:
        """Metadata of the current version without reading its data; None if nothing was written."""
        ...

    def history(self) -> list[PrototypeMeta]:
        """Metadata of every readable version, newest first: the current one, then up to ``history`` earlier."""
        ...

    def heartbeat(self, learner_id: str, info: Mapping[str, InfoValue], ttl_s: float) -> None:
        """Mark ``learner_id`` live for ``ttl_s`` seconds, with a few JSON-able numbers or strings."""
        ...

    def learners(self) -> list[dict[str, Any]]:
        """Live learners by id: ``learner_id``, ``info``, ``heartbeat_age_s``, ``expires_in_s``."""
        ...

    def record_checkpoint(self, info: Mapping[str, Any]) -> None:
        """Remember the last checkpoint (``path``, ``step``, ``time`` in unix seconds; JSON-able)."""
        ...

    def last_checkpoint(self) -> dict[str, Any] | None:
        """What ``record_checkpoint`` stored last (plus ``recorded_at``), or None."""
        ...

    def status(self) -> dict[str, Any]:
        """A JSON-able summary for ``streamssl status`` (see ``format_status``)."""
        ...

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""
        ...


def default_writer_id() -> str:
    """``host:pid``: tells apart two learners that write the same store."""
    return f"{socket.gethostname()}:{os.getpid()}"


def checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def as_prototypes(prototypes: Any, *, copy: bool = False) -> np.ndarray:
    """A (K, D) float32 numpy array from a numpy array or a torch tensor (any device, any float dtype)."""
    if hasattr(prototypes, "detach"):  # a torch tensor; duck-typed so this leaf never imports torch
        prototypes = prototypes.detach().cpu().float().numpy()
    arr = np.asarray(prototypes)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"prototypes must be a non-empty (K, D) matrix, got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"prototypes must be floating point, got {arr.dtype}")
    # copy=True: the caller keeps training on its tensor while a thread writes this one (a CPU float32
    # tensor's .numpy() shares its memory)
    return np.array(arr, dtype=np.float32, order="C", copy=True) if copy else np.ascontiguousarray(arr, np.float32)


def _encode(prototypes: Any) -> tuple[bytes, tuple[int, int]]:
    arr = as_prototypes(prototypes)
    if not np.isfinite(arr).all():
        raise ValueError("prototypes contain NaN or infinity; refusing to publish them")
    return arr.astype(DTYPE, copy=False).tobytes(), (int(arr.shape[0]), int(arr.shape[1]))


def _meta_from_fields(fields: Mapping[str, Any], where: str) -> PrototypeMeta:
    """Parse and check the metadata fields (strings, from a Redis hash or a JSON header)."""

    def get(name: str) -> Any:
        if name not in fields or fields[name] is None:
            raise CorruptPrototypes(f"{where}: field {name!r} is missing")
        return fields[name]

    try:
        shape = get("shape")
        shape = json.loads(shape) if isinstance(shape, str) else shape
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            raise CorruptPrototypes(f"{where}: shape {shape!r} is not [K, D] with positive integers")
        written_at = float(get("written_at"))
        if not math.isfinite(written_at):
            raise ValueError("written_at is not finite")
        meta = PrototypeMeta(version=int(get("version")), step=int(get("step")), shape=(shape[0], shape[1]),
                             dtype=str(get("dtype")), written_at=written_at, writer=str(get("writer")),
                             checksum=str(get("checksum")))
    except (ValueError, TypeError) as exc:
        raise CorruptPrototypes(f"{where}: malformed metadata: {exc}") from None
    if meta.dtype != DTYPE:
        raise CorruptPrototypes(f"{where}: dtype {meta.dtype!r}, expected {DTYPE!r} (little-endian float32)")
    return meta


def _decode(data: bytes, meta: PrototypeMeta, where: str) -> np.ndarray:
    """Check the bytes against their metadata and return a writable (K, D) float32 array."""
    expected_len = meta.shape[0] * meta.shape[1] * 4
    if len(data) != expected_len:
        raise CorruptPrototypes(f"{where}: {len(data)} bytes, but shape {list(meta.shape)} float32 needs "
                                f"{expected_len}")
    if checksum(data) != meta.checksum:
        raise CorruptPrototypes(f"{where}: checksum mismatch (stored {meta.checksum[:20]}..., data hashes to "
                                f"{checksum(data)[:20]}...)")
    return np.frombuffer(data, dtype=DTYPE).reshape(meta.shape).astype(np.float32)


def _check_info(info: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(info)
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"info must be JSON-able (str keys; str, int or float values): {exc}") from None
    return out


class _StatusMixin:
    """``status()`` from the contract's read methods: one implementation for both stores."""

    location: str

    def status(self) -> dict[str, Any]:
        """A JSON-able summary: current prototypes and their age, live learners, last checkpoint."""
        store: PrototypeStore = self  # type: ignore[assignment]
        now = time.time()
        current = store.meta()
        prototypes = None
        if current is not None:
            prototypes = current.to_dict() | {"age_s": max(0.0, now - current.written_at)}
        checkpoint = store.last_checkpoint()
        if checkpoint is not None:
            when = checkpoint.get("time", checkpoint.get("recorded_at"))
            if isinstance(when, int | float):
                checkpoint = checkpoint | {"age_s": max(0.0, now - float(when))}
        return {
            "store": self.location,
            "now": now,
            "prototypes": prototypes,
            "history": [m.version for m in store.history()],
            "learners": store.learners(),
            "last_checkpoint": checkpoint,
        }


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


class RedisPrototypeStore(_StatusMixin):
    """The prototype store in Redis (see the module docstring for the key layout).

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
        data, shape = _encode(prototypes)
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
        meta = _meta_from_fields(fields, where)
        if "data" not in fields:
            raise CorruptPrototypes(f"{where}: field 'data' is missing")
        return _decode(fields["data"], meta, where), meta

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
        return _meta_from_fields(fields, f"Redis {self.location} key {self.key}") if fields else None

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
                out.append(_meta_from_fields(fields, f"Redis {self.location}"))
            except CorruptPrototypes as exc:
                log.warning("prototype history: skipping an unreadable entry: %s", exc)
        return out

    def heartbeat(self, learner_id: str, info: Mapping[str, InfoValue], ttl_s: float) -> None:
        """Say ``learner_id`` is alive for ``ttl_s`` seconds, with a few numbers (step, images/s, ...)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        now = time.time()
        body = json.dumps({"learner_id": learner_id, "info": _check_info(info), "at": now, "ttl_s": float(ttl_s)})
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
        return _live_learners(v for v in values if v is not None)

    def record_checkpoint(self, info: Mapping[str, Any]) -> None:
        """Remember the last checkpoint written (path, step, time) for ``streamssl status``."""
        body = json.dumps(_check_info(info) | {"recorded_at": time.time()})
        with self._talking("recording a checkpoint"):
            self._client.set(self.checkpoint_key, body)

    def last_checkpoint(self) -> dict[str, Any] | None:
        with self._talking("reading the last checkpoint"):
            raw = self._client.get(self.checkpoint_key)
        return _parse_json_object(raw, f"Redis {self.location} key {self.checkpoint_key}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


def _parse_json_object(raw: bytes | str | None, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        log.warning("%s: not JSON, ignored", where)
        return None
    return value if isinstance(value, dict) else None


def _live_learners(raws: Iterable[bytes | str], now: float | None = None) -> list[dict[str, Any]]:
    """Heartbeat bodies -> the live learners, sorted by id. Malformed bodies (others can write) are skipped."""
    now = time.time() if now is None else now
    out = []
    for raw in raws:
        beat = _parse_json_object(raw, "heartbeat")
        if beat is None:
            continue
        try:
            at, ttl = float(beat["at"]), float(beat["ttl_s"])
            entry = {"learner_id": str(beat["learner_id"]), "info": dict(beat.get("info") or {}),
                     "heartbeat_age_s": max(0.0, now - at), "expires_in_s": at + ttl - now}
        except (KeyError, TypeError, ValueError):
            continue
        if entry["expires_in_s"] > 0:
            out.append(entry)
    return sorted(out, key=lambda e: e["learner_id"])


# --------------------------------------------------------------------------------------------- local files

_MAGIC = b"streamssl-prototypes/1\n"
_VERSION_FILE = re.compile(r"prototypes-v(\d{12})\.bin")


class LocalPrototypeStore(_StatusMixin):
    """The prototype store in a local folder: the embedded default, the same contract as Redis.

    Args:
        dir: the store's folder (created on the first write). Files: ``prototypes-v{n:012d}.bin``,
            ``heartbeat-{id}.json``, ``last-checkpoint.json``, ``.prototypes.lock``.
        history: earlier versions kept besides the current one (0: none).
        writer: this writer's id in the metadata; ``host:pid`` by default.
    """

    def __init__(self, dir: str | os.PathLike[str], history: int = 20, *, writer: str | None = None) -> None:
        if history < 0:
            raise ValueError(f"history must be >= 0, got {history}")
        self.dir = Path(dir)
        self.history_len = history
        self.writer = writer or default_writer_id()
        self.location = f"local:{self.dir}"
        self._thread_lock = threading.Lock()

    def _path(self, version: int) -> Path:
        return self.dir / f"prototypes-v{version:012d}.bin"

    def _versions(self) -> list[int]:
        """Versions on disk, newest first."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted((int(m.group(1)) for n in names if (m := _VERSION_FILE.fullmatch(n))), reverse=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise writers: threads with a lock, processes with flock on a lock file."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._thread_lock, open(self.dir / ".prototypes.lock", "a+b") as fh:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _atomic_write(self, path: Path, payload: bytes, *, durable: bool = True) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                if durable:  # the rename must never expose a file whose bytes are not on disk after a crash
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def write(self, prototypes: Any, step: int, *, expected_version: int | None) -> int:
        """Publish (K, D) prototypes taken at ``step``; return the new version (see RedisPrototypeStore)."""
        data, shape = _encode(prototypes)
        with self._locked():
            versions = self._versions()
            current = versions[0] if versions else 0
            if expected_version is not None and expected_version != current:
                raise VersionConflict(expected_version, current, location=self.location)
            new = current + 1
            header = {"version": new, "step": int(step), "shape": list(shape), "dtype": DTYPE,
                      "written_at": time.time(), "writer": self.writer, "checksum": checksum(data)}
            self._atomic_write(self._path(new), _MAGIC + json.dumps(header).encode() + b"\n" + data)
            for old in versions[self.history_len:]:  # keep the new one and `history` earlier ones
                with contextlib.suppress(FileNotFoundError):
                    self._path(old).unlink()
        with contextlib.suppress(OSError):  # make the rename itself durable (best effort)
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return new

    def _load(self, version: int, with_data: bool) -> tuple[np.ndarray | None, PrototypeMeta]:
        path = self._path(version)
        where = f"local store file {path.name}"
        with open(path, "rb") as fh:  # FileNotFoundError is the caller's to handle
            if fh.readline(len(_MAGIC) + 1) != _MAGIC:
                raise CorruptPrototypes(f"{where}: not a prototype file (bad magic line)")
            line = fh.readline(1 << 20)
            if not line.endswith(b"\n"):
                raise CorruptPrototypes(f"{where}: header line missing or too long")
            try:
                header = json.loads(line)
            except ValueError as exc:
                raise CorruptPrototypes(f"{where}: header is not JSON: {exc}") from None
            if not isinstance(header, dict):
                raise CorruptPrototypes(f"{where}: header is not a JSON object")
            meta = _meta_from_fields(header, where)
            if meta.version != version:
                raise CorruptPrototypes(f"{where}: header says version {meta.version}")
            return (_decode(fh.read(), meta, where) if with_data else None), meta

    def read(self, version: int | None = None) -> tuple[np.ndarray, PrototypeMeta] | None:
        """The current prototypes (None if none were written yet), or those of an earlier ``version``."""
        for _ in range(3):  # a concurrent writer may prune the file we just listed; list again
            versions = self._versions()
            if version is None and not versions:
                return None
            target = versions[0] if version is None else int(version)
            try:
                arr, meta = self._load(target, with_data=True)
            except FileNotFoundError:
                if version is not None:
                    raise UnknownVersion(f"prototype version {version} is not in {self.location} "
                                         f"(kept: {versions})") from None
                continue
            assert arr is not None
            return arr, meta
        raise StoreUnavailable(f"{self.location}: versions kept changing under the reader")  # pragma: no cover

    def meta(self) -> PrototypeMeta | None:
        for _ in range(3):
            versions = self._versions()
            if not versions:
                return None
            with contextlib.suppress(FileNotFoundError):
                return self._load(versions[0], with_data=False)[1]
        return None  # pragma: no cover

    def history(self) -> list[PrototypeMeta]:
        """Metadata of every readable version, newest first: the current one, then the earlier ones kept."""
        out = []
        for v in self._versions():
            try:
                out.append(self._load(v, with_data=False)[1])
            except FileNotFoundError:
                continue
            except CorruptPrototypes as exc:
                log.warning("prototype history: skipping an unreadable entry: %s", exc)
        return out

    def _heartbeat_path(self, learner_id: str) -> Path:
        # Ids come from configuration or host names: keep file names safe (no separators, no "..") and
        # distinct (a short hash of the original id).
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", learner_id).strip(".")[:64]
        digest = hashlib.sha256(learner_id.encode()).hexdigest()[:8]
        return self.dir / f"heartbeat-{safe}-{digest}.json"

    def heartbeat(self, learner_id: str, info: Mapping[str, InfoValue], ttl_s: float) -> None:
        """Say ``learner_id`` is alive for ``ttl_s`` seconds (a JSON file holding its expiry)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        body = {"learner_id": learner_id, "info": _check_info(info), "at": time.time(), "ttl_s": float(ttl_s)}
        # no fsync: a heartbeat lost in a crash is what a crash should look like anyway
        self._atomic_write(self._heartbeat_path(learner_id), json.dumps(body).encode(), durable=False)

    def learners(self) -> list[dict[str, Any]]:
        """Live learners (heartbeat not expired): learner_id, info, heartbeat_age_s, expires_in_s."""
        raws = []
        for path in sorted(self.dir.glob("heartbeat-*.json")):
            with contextlib.suppress(OSError):
                raws.append(path.read_bytes())
        return _live_learners(raws)

    def record_checkpoint(self, info: Mapping[str, Any]) -> None:
        body = _check_info(info) | {"recorded_at": time.time()}
        self._atomic_write(self.dir / "last-checkpoint.json", json.dumps(body).encode())

    def last_checkpoint(self) -> dict[str, Any] | None:
        try:
            raw = (self.dir / "last-checkpoint.json").read_bytes()
        except FileNotFoundError:
            return None
        return _parse_json_object(raw, f"{self.location} last-checkpoint.json")

    def close(self) -> None:
        pass


def open_store(cfg: StoreConfig, *, local_dir: str | os.PathLike[str], writer: str | None = None) -> PrototypeStore:
    """The store ``cfg`` asks for: Redis when ``cfg.url`` is set, else a local store in ``local_dir``."""
    if not cfg.url:
        return LocalPrototypeStore(local_dir, history=cfg.history, writer=writer)
    return RedisPrototypeStore(cfg.url, prefix=cfg.prefix, history=cfg.history, writer=writer,
                               socket_timeout_s=cfg.socket_timeout_s, tls_ca_file=cfg.tls_ca_file,
                               tls_cert_file=cfg.tls_cert_file, tls_key_file=cfg.tls_key_file)


# --------------------------------------------------------------------------------------------- status text


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_status(status: Mapping[str, Any]) -> str:
    """``status()`` as lines for a person (``streamssl status`` without ``--json``)."""
    lines = [f"store        {status.get('store', '?')}"]
    proto = status.get("prototypes")
    if proto:
        k, d = proto["shape"]
        lines.append(f"prototypes   version {proto['version']}, step {proto['step']}, {k} x {d} float32, "
                     f"written {_age(proto['age_s'])} ago by {proto['writer']}")
    else:
        lines.append("prototypes   none written yet")
    history = status.get("history") or []
    if history:
        lines.append(f"history      {len(history)} version(s) readable: {', '.join(map(str, history))}")
    learners = status.get("learners") or []
    lines.append(f"learners     {len(learners)} live")
    for entry in learners:
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in sorted(entry.get("info", {}).items()))
        lines.append(f"  {entry['learner_id']}  heartbeat {_age(entry['heartbeat_age_s'])} ago  {info}".rstrip())
    ckpt = status.get("last_checkpoint")
    if ckpt:
        parts = [str(ckpt.get("path", "?"))]
        if "step" in ckpt:
            parts.append(f"step {ckpt['step']}")
        if "age_s" in ckpt:
            parts.append(f"{_age(ckpt['age_s'])} ago")
        lines.append("checkpoint   " + ", ".join(parts))
    else:
        lines.append("checkpoint   none recorded")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- writer


class BackgroundWriter:
    """Publishes prototypes (and heartbeats, checkpoint records) from a thread, so training never waits.

    ``submit`` puts the prototypes in a single slot (latest value wins; the array is copied) and returns at
    once. The thread writes them; a failed write is retried with exponential backoff (``min_backoff_s``
    doubling up to ``max_backoff_s``) while newer submissions replace the pending value, so on reconnect
    the newest prototypes are written and the lag drops to 0. An outage is logged once: a warning when the
    first write fails, an info line when writes resume, with the outage's length. Nothing raises into the
    caller except a programming error in ``submit`` (a non-matrix).

    Version conflicts (policy): this writer remembers the version it wrote last and writes with that as
    ``expected_version``. If the store holds another version:

    * the store went back (its version is lower, or empty: Redis restarted without persistence, or keys
      were deleted): not a conflict; the writer writes on top and says so once at info level;
    * our own previous write landed but its reply was lost (same writer, step and checksum): counted as
      written;
    * another writer wrote: ``n_conflicts`` += 1, a warning naming the other writer (once per writer), and
      we write on top: last writer wins. The other's version stays readable in the history for rollback.
      Two learners writing one prefix is a configuration mistake (give each run its own ``store.prefix``);
      skipping our writes instead would leave a restarted learner unable to publish until its step passed
      the one of its own dead predecessor.

    Counters (read them from any thread): ``n_writes``, ``n_failures``, ``n_conflicts``, ``n_rejected``
    (non-finite prototypes refused), ``last_success_step``, ``last_version``, ``lag_steps``, ``outage``.

    Args:
        store: any ``PrototypeStore``.
        on_result: called from the writer thread after each prototype write attempt with (ok, seconds):
            for metrics. Exceptions it raises are logged and ignored.
        logger: where the outage lines go (``streamssl.store`` by default).
    """

    def __init__(self, store: PrototypeStore, *, on_result: Callable[[bool, float], None] | None = None,
                 logger: logging.Logger | None = None, min_backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 max_conflict_retries: int = 3) -> None:
        if not 0 < min_backoff_s <= max_backoff_s:
            raise ValueError("need 0 < min_backoff_s <= max_backoff_s")
        self.store = store
        self.on_result = on_result
        self.log = logger or log
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_conflict_retries = max_conflict_retries
        self.n_writes = 0
        self.n_failures = 0
        self.n_conflicts = 0
        self.n_rejected = 0
        self.last_success_step: int | None = None
        self.last_version: int | None = None
        self.submitted_step: int | None = None
        self.outage = False
        self.last_error = ""
        self._first_step: int | None = None
        self._outage_started = 0.0
        self._outage_failures = 0
        self._rejecting = False
        self._warned_writers: set[str] = set()
        self._cond = threading.Condition()
        self._prototypes: tuple[np.ndarray, int] | None = None
        self._heartbeat: tuple[str, dict[str, Any], float] | None = None
        self._checkpoint: dict[str, Any] | None = None
        self._busy = False
        self._kick = False
        self._flushing = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="streamssl-store-writer", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------- caller side

    def submit(self, prototypes: Any, step: int) -> None:
        """Queue (K, D) prototypes of ``step`` for writing; never blocks on the store. Copies the array."""
        arr = as_prototypes(prototypes, copy=True)
        if not np.isfinite(arr).all():
            self.n_rejected += 1
            if not self._rejecting:  # once per run of bad submissions, not every time
                self.log.warning("prototypes at step %d contain NaN or infinity: not published (the store "
                                 "keeps version %s)", step, self.last_version)
            self._rejecting = True
            return
        self._rejecting = False
        with self._cond:
            if self._closing:
                return
            self._prototypes = (arr, int(step))
            self.submitted_step = int(step)
            if self._first_step is None:
                self._first_step = int(step)
            self._cond.notify_all()

    def heartbeat(self, learner_id: str, info: Mapping[str, InfoValue], ttl_s: float) -> None:
        """Queue a heartbeat (latest wins); best effort, never blocks."""
        with self._cond:
            if not self._closing:
                self._heartbeat = (learner_id, _check_info(info), float(ttl_s))
                self._cond.notify_all()

    def record_checkpoint(self, info: Mapping[str, Any]) -> None:
        """Queue a checkpoint record (latest wins); never blocks."""
        with self._cond:
            if not self._closing:
                self._checkpoint = _check_info(info)
                self._cond.notify_all()

    @property
    def lag_steps(self) -> int:
        """Newest submitted step minus the newest step written (the first submitted step before any write)."""
        submitted = self.submitted_step
        if submitted is None:
            return 0
        written = self.last_success_step if self.last_success_step is not None else self._first_step
        return max(0, submitted - (written if written is not None else submitted))

    def flush(self, timeout_s: float) -> bool:
        """Write everything pending now (retrying every ``min_backoff_s``); True if all of it was written
        within ``timeout_s``. For shutdown: call it, then ``close``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._flushing += 1
            self._kick = True
            self._cond.notify_all()
            try:
                while self._has_work() or self._busy:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._thread.is_alive():
                        return False
                    self._cond.wait(remaining)
                return True
            finally:
                self._flushing -= 1

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; pending values are dropped (``flush`` first to keep them)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- thread side

    def _has_work(self) -> bool:
        return self._prototypes is not None or self._heartbeat is not None or self._checkpoint is not None

    def _run(self) -> None:
        backoff = self.min_backoff_s
        while True:
            with self._cond:
                while not self._closing and not self._has_work():
                    self._cond.wait()
                if self._closing:
                    return
                jobs = (self._prototypes, self._checkpoint, self._heartbeat)
                self._prototypes = self._checkpoint = self._heartbeat = None
                self._busy = True
                self._kick = False
            ok = self._attempt(*jobs)
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                if ok:
                    backoff = self.min_backoff_s
                    continue
                # Back off; wake early only to stop or when flush() asks for a prompt retry.
                wait_s = self.min_backoff_s if self._flushing else backoff
                self._cond.wait_for(lambda: self._closing or self._kick, timeout=wait_s)
                backoff = min(backoff * 2, self.max_backoff_s)

    def _attempt(self, prototypes: tuple[np.ndarray, int] | None, checkpoint: dict[str, Any] | None,
                 beat: tuple[str, dict[str, Any], float] | None) -> bool:
        """Try each job in turn; on the first failure, put it and the rest back (unless newer ones came)."""
        try:
            if prototypes is not None:
                if not self._write_prototypes(*prototypes):
                    return False
                prototypes = None
            if checkpoint is not None:
                self.store.record_checkpoint(checkpoint)
                self._succeeded()
                checkpoint = None
            if beat is not None:
                self.store.heartbeat(*beat)
                self._succeeded()
                beat = None
            return True
        except Exception as exc:  # never raise into the daemon: any failure is counted and retried
            self._failed(exc)
            return False
        finally:
            with self._cond:
                if prototypes is not None and self._prototypes is None:
                    self._prototypes = prototypes
                if checkpoint is not None and self._checkpoint is None:
                    self._checkpoint = checkpoint
                if beat is not None and self._heartbeat is None:
                    self._heartbeat = beat

    def _write_prototypes(self, arr: np.ndarray, step: int) -> bool:
        t0 = time.monotonic()
        try:
            version = self._write_resolving_conflicts(arr, step)
        except Exception as exc:  # never raise into the daemon
            self._failed(exc)
            self._report(False, time.monotonic() - t0)
            return False
        self.n_writes += 1
        self.last_version = version
        self.last_success_step = step
        self._succeeded()
        self._report(True, time.monotonic() - t0)
        return True

    def _write_resolving_conflicts(self, arr: np.ndarray, step: int) -> int:
        expected = self.last_version  # None before our first write: unconditional
        for _ in range(self.max_conflict_retries + 1):
            try:
                return self.store.write(arr, step, expected_version=expected)
            except VersionConflict as exc:
                conflict = exc
            current = self.store.meta()
            if current is None or (self.last_version is not None and current.version < self.last_version):
                self.log.info("prototype store %s went back to version %s (restarted empty or cleared); "
                              "writing the newest prototypes on top", self.store.location,
                              current.version if current else 0)
            elif (current.writer == self.store.writer and current.step == step
                  and current.checksum == checksum(arr.astype(DTYPE, copy=False).tobytes())):
                return current.version  # our previous attempt landed; only its reply was lost
            else:
                self.n_conflicts += 1
                if current.writer not in self._warned_writers:
                    self._warned_writers.add(current.writer)
                    self.log.warning("prototype store %s: writer %s wrote version %d (step %d) since our "
                                     "version %s; writing on top (last writer wins). Two learners on one "
                                     "store.prefix?", self.store.location, current.writer, current.version,
                                     current.step, self.last_version)
            expected = current.version if current is not None else 0
        raise conflict

    def _report(self, ok: bool, seconds: float) -> None:
        if self.on_result is None:
            return
        try:
            self.on_result(ok, seconds)
        except Exception:
            self.log.exception("BackgroundWriter on_result callback failed")

    def _failed(self, exc: BaseException) -> None:
        self.n_failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._outage_failures += 1
        if not self.outage:
            self.outage = True
            self._outage_started = time.monotonic()
            self._outage_failures = 1
            self.log.warning("prototype store %s: write failed (%s); training goes on, retrying every "
                             "%.1f..%.0f s and writing the newest prototypes once it is back",
                             self.store.location, self.last_error, self.min_backoff_s, self.max_backoff_s)
        else:
            self.log.debug("prototype store %s: still failing: %s", self.store.location, self.last_error)

    def _succeeded(self) -> None:
        if self.outage:
            self.log.info("prototype store %s: writes resumed after a %.1f s outage (%d failed attempts)",
                          self.store.location, time.monotonic() - self._outage_started, self._outage_failures)
            self.outage = False  # after the log line: a reader that sees the outage over also sees the line


__all__ = [
    "BackgroundWriter", "CorruptPrototypes", "LocalPrototypeStore", "PrototypeMeta", "PrototypeStore",
    "RedisPrototypeStore", "StoreAuthError", "StoreError", "StoreUnavailable", "UnknownVersion",
    "VersionConflict", "as_prototypes", "checksum", "format_status", "open_store", "redact_url",
]
