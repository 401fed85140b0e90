"""Prototype store: the shared, small, hot state of a run (docs/architecture.md, "The prototype store").

A leaf of the flow. The daemon publishes a method's prototypes or centroids (K x D float32: SwAV,
DeepCluster-v2) here every ``store.every_steps`` steps, through a ``BackgroundWriter`` so that a slow or
absent store never stalls training; a restarted or
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

import os
from typing import TYPE_CHECKING

from streamssl.store.contract import (
    CorruptPrototypes,
    PrototypeMeta,
    PrototypeStore,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
    UnknownVersion,
    VersionConflict,
    as_prototypes,
    checksum,
    format_status,
    redact_url,
)
from streamssl.store.local import LocalPrototypeStore
from streamssl.store.redis_store import RedisPrototypeStore
from streamssl.store.writer import BackgroundWriter

if TYPE_CHECKING:
    from streamssl.config import StoreConfig


def open_store(cfg: StoreConfig, *, local_dir: str | os.PathLike[str], writer: str | None = None) -> PrototypeStore:
    """The store ``cfg`` asks for: Redis when ``cfg.url`` is set, else a local store in ``local_dir``."""
    if not cfg.url:
        return LocalPrototypeStore(local_dir, history=cfg.history, writer=writer)
    return RedisPrototypeStore(cfg.url, prefix=cfg.prefix, history=cfg.history, writer=writer,
                               socket_timeout_s=cfg.socket_timeout_s, tls_ca_file=cfg.tls_ca_file,
                               tls_cert_file=cfg.tls_cert_file, tls_key_file=cfg.tls_key_file)


__all__ = [
    "BackgroundWriter", "CorruptPrototypes", "LocalPrototypeStore", "PrototypeMeta", "PrototypeStore",
    "RedisPrototypeStore", "StoreAuthError", "StoreError", "StoreUnavailable", "UnknownVersion",
    "VersionConflict", "as_prototypes", "checksum", "format_status", "open_store", "redact_url",
]
