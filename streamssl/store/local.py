"""``LocalPrototypeStore``: the prototype store as local files (the embedded default)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

try:  # POSIX: a real lock between processes sharing a local store
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None  # type: ignore[assignment]

from streamssl.atomic import fsync_folder, write_atomic
from streamssl.store.contract import (
    DTYPE,
    CorruptPrototypes,
    InfoValue,
    PrototypeMeta,
    StatusMixin,
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

log = logging.getLogger("streamssl.store")  # one logger for the store, whichever file it lives in

# --------------------------------------------------------------------------------------------- local files

_MAGIC = b"streamssl-prototypes/1\n"
_VERSION_FILE = re.compile(r"prototypes-v(\d{12})\.bin")


class LocalPrototypeStore(StatusMixin):
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

    def write(self, prototypes: Any, step: int, *, expected_version: int | None) -> int:
        """Publish (K, D) prototypes taken at ``step``; return the new version (see RedisPrototypeStore)."""
        data, shape = encode(prototypes)
        with self._locked():
            versions = self._versions()
            current = versions[0] if versions else 0
            if expected_version is not None and expected_version != current:
                raise VersionConflict(expected_version, current, location=self.location)
            new = current + 1
            header = {"version": new, "step": int(step), "shape": list(shape), "dtype": DTYPE,
                      "written_at": time.time(), "writer": self.writer, "checksum": checksum(data)}
            write_atomic(self._path(new), lambda fh: fh.write(_MAGIC + json.dumps(header).encode() + b"\n" + data))
            for old in versions[self.history_len:]:  # keep the new one and `history` earlier ones
                with contextlib.suppress(FileNotFoundError):
                    self._path(old).unlink()
        fsync_folder(self.dir)  # the rename and the removals survive a crash too
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
            meta = meta_from_fields(header, where)
            if meta.version != version:
                raise CorruptPrototypes(f"{where}: header says version {meta.version}")
            return (decode(fh.read(), meta, where) if with_data else None), meta

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
        body = {"learner_id": learner_id, "info": check_info(info), "at": time.time(), "ttl_s": float(ttl_s)}
        # no fsync: a heartbeat lost in a crash is what a crash should look like anyway
        write_atomic(self._heartbeat_path(learner_id), lambda fh: fh.write(json.dumps(body).encode()), durable=False)

    def learners(self) -> list[dict[str, Any]]:
        """Live learners (heartbeat not expired): learner_id, info, heartbeat_age_s, expires_in_s."""
        raws = []
        for path in sorted(self.dir.glob("heartbeat-*.json")):
            with contextlib.suppress(OSError):
                raws.append(path.read_bytes())
        return live_learners(raws)

    def record_checkpoint(self, info: Mapping[str, Any]) -> None:
        body = check_info(info) | {"recorded_at": time.time()}
        write_atomic(self.dir / "last-checkpoint.json", lambda fh: fh.write(json.dumps(body).encode()))

    def last_checkpoint(self) -> dict[str, Any] | None:
        try:
            raw = (self.dir / "last-checkpoint.json").read_bytes()
        except FileNotFoundError:
            return None
        return parse_json_object(raw, f"{self.location} last-checkpoint.json")

    def close(self) -> None:
        pass


