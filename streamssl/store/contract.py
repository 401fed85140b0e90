"""The prototype store's contract: its errors, the metadata of a version, the ``PrototypeStore`` protocol
both implementations follow, the encoding they share (raw little-endian float32 with a sha256 checksum,
JSON for everything else) and the text of ``streamssl status``."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from streamssl.errors import StreamsslError
from streamssl.urls import redact

log = logging.getLogger("streamssl.store")  # one logger for the store, whichever file it lives in

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


def encode(prototypes: Any) -> tuple[bytes, tuple[int, int]]:
    arr = as_prototypes(prototypes)
    if not np.isfinite(arr).all():
        raise ValueError("prototypes contain NaN or infinity; refusing to publish them")
    return arr.astype(DTYPE, copy=False).tobytes(), (int(arr.shape[0]), int(arr.shape[1]))


def meta_from_fields(fields: Mapping[str, Any], where: str) -> PrototypeMeta:
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


def decode(data: bytes, meta: PrototypeMeta, where: str) -> np.ndarray:
    """Check the bytes against their metadata and return a writable (K, D) float32 array."""
    expected_len = meta.shape[0] * meta.shape[1] * 4
    if len(data) != expected_len:
        raise CorruptPrototypes(f"{where}: {len(data)} bytes, but shape {list(meta.shape)} float32 needs "
                                f"{expected_len}")
    if checksum(data) != meta.checksum:
        raise CorruptPrototypes(f"{where}: checksum mismatch (stored {meta.checksum[:20]}..., data hashes to "
                                f"{checksum(data)[:20]}...)")
    return np.frombuffer(data, dtype=DTYPE).reshape(meta.shape).astype(np.float32)


def check_info(info: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(info)
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"info must be JSON-able (str keys; str, int or float values): {exc}") from None
    return out


class StatusMixin:
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


def parse_json_object(raw: bytes | str | None, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        log.warning("%s: not JSON, ignored", where)
        return None
    return value if isinstance(value, dict) else None


def live_learners(raws: Iterable[bytes | str], now: float | None = None) -> list[dict[str, Any]]:
    """Heartbeat bodies -> the live learners, sorted by id. Malformed bodies (others can write) are skipped."""
    now = time.time() if now is None else now
    out = []
    for raw in raws:
        beat = parse_json_object(raw, "heartbeat")
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


