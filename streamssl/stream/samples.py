"""Tar members -> samples: the second stage of the flow (source -> samples -> augment -> learner).

For each shard URL from a source (source.py) this stage reads the tar members, groups them by key into
samples, keeps one image per sample (``jpg``, ``jpeg``, ``png`` or ``webp``; a ``.cls`` label when present;
other members ignored), runs cheap checks before any decoder sees the bytes, and mixes shards through a
shuffle buffer. It never decodes pixels in Python except to transcode the rare image whose mode an 8-bit
RGB decoder may mishandle (CMYK, 16-bit, palette, ...), once, to an 8-bit RGB PNG.

Three modules: ``images.py`` (the image checks), ``shards.py`` (one shard's tar members -> samples, through
webdataset's opener and key grouping) and this one (the stream: shards one after another, the shuffle
buffer, the position). The shuffle buffer is written here because webdataset's ``filters.shuffle`` cannot
drain while the source is idle, which would hold samples and their shards' acks until more shards come.

Bad input never stops the stream: a bad sample is skipped and counted through an injected
``on_bad(reason)`` callback with a reason from ``streamssl.stream.reasons`` (a bounded label set for metrics); an
unreadable shard is counted once as ``shard_error`` and the stream moves on to the next shard.

Position and acknowledgement (``SampleStream``): every sample of a shard is *settled* when it left the
shuffle buffer to the consumer or was dropped as bad. A shard is done, and ``source.mark_done(url)`` is
called (an XACK for Redis), only when the whole shard was read and every sample of it settled. A checkpoint
stores, per open shard, the settled member indices; on resume those are skipped and everything else of the
shard is read again, including samples that sat in the shuffle buffer when the checkpoint was taken: they
had not reached the learner, so delivery is at-least-once, never at-most-once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from streamssl.config import SourceConfig
from streamssl.stream.backoff import RateLimitedLog, ShardBackoff
from streamssl.stream.shards import OnBad, Sample, ignore_bad, read_shard
from streamssl.stream.source import ShardSource
from streamssl.urls import redact

log = logging.getLogger(__name__)
IDLE_LOG_FIRST_S = 10.0  # a quiet source is reported after this long, then every IDLE_LOG_EVERY_S
IDLE_LOG_EVERY_S = 60.0

T = TypeVar("T")
_EXHAUSTED = object()


# --------------------------------------------------------------------------------------------- the stream


def _to_ranges(indices: set[int]) -> list[list[int]]:
    """{0, 1, 2, 5} -> [[0, 3], [5, 6]] (half-open): settled indices, compact in a checkpoint."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _from_ranges(ranges: Iterable[Iterable[int]]) -> set[int]:
    out: set[int] = set()
    for start, stop in ranges:
        out.update(range(int(start), int(stop)))
    return out


def shuffled(items: Iterable[T | None], size: int, rng: random.Random) -> Iterator[T]:
    """A shuffle buffer of ``size`` items: once full, each new item displaces a random one, which is
    yielded. A ``None`` in ``items`` (the source is idle) drains the buffer: a quiet stream delivers what it
    holds rather than keep it until more arrives. At the end the rest comes out in random order."""
    buf: list[T] = []

    def pick() -> T:
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        return buf.pop()

    for item in items:
        if item is None:
            while buf:
                yield pick()
            continue
        buf.append(item)
        if len(buf) >= max(size, 1):
            yield pick()
    while buf:
        yield pick()


@dataclass(eq=False)
class _OpenShard:
    url: str
    settled: set[int] = field(default_factory=set)  # indices handed out or dropped as bad
    n_buffered: int = 0  # samples of this shard waiting in the shuffle buffer
    eof: bool = False  # read to its end (or to an unrecoverable error)


class SampleStream:
    """Source + shard reading + checks + shuffle buffer, with a resumable position.

    Iterate it for ``Sample`` s. Shards from the source are read one after another; good samples pass
    through a shuffle buffer of ``cfg.shuffle_buffer`` samples (0: none) seeded from ``cfg.seed``, which
    drains whenever the source is idle; bad ones are counted through ``on_bad``. When the last sample of a
    shard leaves the stream, ``ack(url)`` is called (default ``source.mark_done``: XACK for Redis, recorded
    for a followed folder).

    ``state_dict()`` holds the source's state and, per open shard, its URL and the indices already settled
    (handed out or dropped). ``load_state_dict()`` restores both; iteration then first re-reads the open
    shards, skipping settled indices, then continues with the source. Samples that were in the shuffle
    buffer at checkpoint time are read again: at-least-once. The buffer's order after a resume is seeded
    anew (from the seed and the number of samples handed out), so it is not bit-identical to an unbroken run.

    ``defer_ack=True`` holds acknowledgements back until ``commit()``: the daemon calls ``commit()`` once the
    checkpoint with the last ``state_dict()`` is safely written, so a crash between checkpoints cannot ack a
    shard whose samples the restored model never saw. Without it, shards acked after the last checkpoint are
    not read again after a crash.

    Use from one thread: take ``state_dict()`` between two samples, in the thread that iterates.
    """

    def __init__(self, source: ShardSource, cfg: SourceConfig, *, on_bad: OnBad = ignore_bad,
                 ack: Callable[[str], None] | None = None, defer_ack: bool = False) -> None:
        self.source = source
        self.cfg = cfg
        self.on_bad = on_bad
        self.ack = ack if ack is not None else source.mark_done
        self.defer_ack = defer_ack
        self.n_samples = 0  # samples handed out, over restarts
        self.n_shards_done = 0
        self._open: list[_OpenShard] = []
        self._restored: list[_OpenShard] = []
        self._ack_on_start: list[str] = []  # done before the restored checkpoint, not acked then
        self._uncommitted: list[str] = []  # done shards whose ack waits for commit()
        self._n_in_state = 0  # how many of _uncommitted the last state_dict() recorded
        self._lock = threading.RLock()
        # Set except while commit() waits for the lock: the iterating thread then waits before its next call
        # into the source. Without it a source that polls back to back (an idle Redis stream) re-takes the lock
        # the moment it lets go and can starve commit() for minutes; with it commit() waits for at most the
        # one call in flight (one poll: source.poll_s).
        self._source_turn = threading.Event()
        self._source_turn.set()
        self._closed = threading.Event()
        self.backoff = ShardBackoff()
        self._misses = 0  # shards in a row that gave no sample (failed, or skipped while backing off)
        self._all_failing_log = RateLimitedLog(log, limit=1, interval_s=60.0)
        self.idle_since: float | None = None  # monotonic time the source went quiet; None while shards flow
        self._next_idle_log = IDLE_LOG_FIRST_S

    # ------------------------------------------------------------------ reading

    def _read(self, shard: _OpenShard) -> Iterator[tuple[_OpenShard, Sample]]:
        cfg = self.cfg
        # One sample of look-ahead: the shard's end is known before its last sample is handed on, so the
        # shard is acked as that sample leaves the stream, not when the consumer asks for the one after.
        held: Sample | None = None
        failed, good = False, 0

        def on_bad(reason: str) -> None:
            nonlocal failed
            failed = failed or reason in ("shard_error", "refused_url")
            self.on_bad(reason)

        for index, sample in read_shard(shard.url, allow_pipe=cfg.allow_pipe,
                                        max_member_bytes=cfg.max_member_bytes, max_pixels=cfg.max_pixels,
                                        on_bad=on_bad, skip=shard.settled):
            if sample is None:
                shard.settled.add(index)
                continue
            good += 1
            if held is not None:
                shard.n_buffered += 1
                yield shard, held
            held = sample
        shard.eof = True
        if held is not None:
            shard.n_buffered += 1
            yield shard, held
        if good:
            self.backoff.succeeded(shard.url)
            self._misses = 0
        elif failed:
            delay = self.backoff.failed(shard.url)
            self._misses += 1
            log.debug("shard %s failed %d time(s) in a row; not tried again for %.0f s", redact(shard.url),
                      self.backoff.failures(shard.url), delay)
        self._maybe_done(shard)

    def _entries(self) -> Iterator[tuple[_OpenShard, Sample] | None]:
        restored, self._restored = self._restored, []
        for shard in restored:
            yield from self._read(shard)
        urls = iter(self.source)
        while True:
            self._source_turn.wait()  # a waiting commit() goes first
            with self._lock:  # commit() may ack from another thread: never while the source moves
                url = next(urls, _EXHAUSTED)
            if url is _EXHAUSTED:
                return
            if url is None:  # idle tick from the source
                self._note_idle()
                yield None
                continue
            self.idle_since, self._next_idle_log = None, IDLE_LOG_FIRST_S
            shard = _OpenShard(url)
            self._open.append(shard)
            wait = self.backoff.wait_s(url)
            if wait > 0:  # it failed lately
                self._misses += 1
                if self._misses < self.backoff.n_failing:  # others may work: skip it, settled like a failed shard
                    shard.eof = True
                    self._maybe_done(shard)
                    continue
                self._all_failing_log.warning(
                    "all %d shard URLs met lately are failing (%s, ...); next try in %.0f s, backing off up to "
                    "%.0f s", self.backoff.n_failing, redact(url), wait, self.backoff.max_s)
                yield None  # the shuffle buffer drains while we wait
                if self._closed.wait(wait):
                    return
            yield from self._read(shard)

    def _note_idle(self) -> None:
        now = time.monotonic()
        if self.idle_since is None:
            self.idle_since = now
        elif now - self.idle_since >= self._next_idle_log:
            describe = getattr(self.source, "describe", None)
            log.info("waiting for new shards (%s) for %.0f s", describe() if describe else "the source",
                     now - self.idle_since)
            self._next_idle_log += IDLE_LOG_EVERY_S

    def idle_seconds(self) -> float:
        """How long the source has had no new shard (0 while shards flow); readable from any thread."""
        since = self.idle_since
        return 0.0 if since is None else time.monotonic() - since

    def _maybe_done(self, shard: _OpenShard) -> None:
        if not shard.eof or shard.n_buffered > 0 or shard not in self._open:
            return
        self._open.remove(shard)
        self.n_shards_done += 1
        if self.defer_ack:
            with self._lock:
                self._uncommitted.append(shard.url)
        else:
            self.ack(shard.url)

    def __iter__(self) -> Iterator[Sample]:
        # The restored checkpoint covers these shards: safe to ack now, whatever defer_ack says.
        for url in self._ack_on_start:
            self.ack(url)
        self._ack_on_start = []
        rng = random.Random(self.cfg.seed * 1_000_003 + self.n_samples)
        for shard, sample in shuffled(self._entries(), self.cfg.shuffle_buffer, rng):
            shard.n_buffered -= 1
            shard.settled.add(sample.index)
            self.n_samples += 1
            self._maybe_done(shard)  # before the yield: the sample is handed out at this point
            yield sample

    def close(self) -> None:
        """Stop waiting for shards (from another thread too): iteration ends at the next poll."""
        self._closed.set()
        self.source.close()

    # ------------------------------------------------------------------ position

    def commit(self, state: dict[str, Any] | None = None) -> None:
        """Ack the shards done as of ``state`` (a ``state_dict()`` result), or as of the last ``state_dict()``.

        With a prefetching consumer the last ``state_dict()`` runs ahead of what was trained on: pass the state
        that the checkpoint recorded. Safe to call from another thread than the iterating one: it waits for at
        most the source call in flight there.
        """
        self._source_turn.clear()
        try:
            self._commit(state)
        finally:
            self._source_turn.set()

    def _commit(self, state: dict[str, Any] | None) -> None:
        with self._lock:
            if state is not None:
                covered = set(state.get("unacked", ()))
                done = [url for url in self._uncommitted if url in covered]
                self._uncommitted = [url for url in self._uncommitted if url not in covered]
                self._n_in_state = 0
            else:
                n = len(self._uncommitted) if not self.defer_ack else self._n_in_state
                done, self._uncommitted = self._uncommitted[:n], self._uncommitted[n:]
                self._n_in_state = 0
            for url in done:
                self.ack(url)

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable position: source state, open shards with their settled indices."""
        with self._lock:
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        self._n_in_state = len(self._uncommitted)
        return {
            "source": self.source.state_dict(),
            "open": [{"url": s.url, "settled": _to_ranges(s.settled)} for s in self._open],
            "unacked": [*self._ack_on_start, *self._uncommitted],
            "n_samples": self.n_samples,
            "n_shards_done": self.n_shards_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; call before iterating."""
        self.source.load_state_dict(state.get("source", {}))
        self._open = [_OpenShard(str(shard["url"]), _from_ranges(shard.get("settled", ())))
                      for shard in state.get("open", ())]
        self._restored = list(self._open)
        self._ack_on_start = [str(u) for u in state.get("unacked", ())]
        self._uncommitted = []
        self._n_in_state = 0
        self.n_samples = int(state.get("n_samples", 0))
        self.n_shards_done = int(state.get("n_shards_done", 0))


__all__ = ["SampleStream", "shuffled"]
