"""``BackgroundWriter``: publishes prototypes and heartbeats from a thread, so that a slow or absent store never
stalls training."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from streamssl.store.contract import (
    DTYPE,
    InfoValue,
    PrototypeStore,
    VersionConflict,
    as_prototypes,
    check_info,
    checksum,
)

log = logging.getLogger("streamssl.store")  # one logger for the store, whichever file it lives in

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
                self._heartbeat = (learner_id, check_info(info), float(ttl_s))
                self._cond.notify_all()

    def record_checkpoint(self, info: Mapping[str, Any]) -> None:
        """Queue a checkpoint record (latest wins); never blocks."""
        with self._cond:
            if not self._closing:
                self._checkpoint = check_info(info)
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


