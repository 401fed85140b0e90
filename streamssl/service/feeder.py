"""The data path's thread: samples -> multi-crop -> full batches of views, prefetched into a bounded queue, each
tagged with the stream position after its last sample (the daemon checkpoints that position once the batch
was trained on)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from streamssl.augment import make_multicrop
from streamssl.config import Config
from streamssl.devices import use_device
from streamssl.distributed import World
from streamssl.redis_client import TLSFiles
from streamssl.stream.replay import ReplayBuffer, ReplayStream
from streamssl.stream.samples import SampleStream
from streamssl.stream.source import make_source

log = logging.getLogger("streamssl.service.daemon")


@dataclass
class Batch:
    """A full batch of views and the stream position right after its last sample."""

    views: list[Tensor]
    position: dict[str, Any] | None = None
    ids: list[str] | None = None  # Sample.id of each image, in batch order


END = object()  # the feeder's "stream ended" marker
ONE = World()  # a single process



class Feeder(threading.Thread):
    """Producer thread: samples -> multi-crop -> full batches, into a bounded queue.

    A multi-crop call may drop undecodable samples; the feeder tops the batch up with more samples so the
    learner always gets exactly ``batch_size`` images (a final partial batch of a finite stream is passed on
    when it has at least 2 images; not with ``full_batches``, which ranks need: their batch norm and the
    methods' gathers meet equal batches on every rank). ``device``: where the views go; on CUDA the thread
    makes it its current device before any CUDA call. When the stream ends or stops, the multi-crop's
    ``close`` (if it has one) releases its workers. ``replay``: a replay stage around ``stream`` whose draws
    are batched instead (the position is still the stream's; a sample the multi-crop drops leaves the buffer).
    """

    def __init__(self, stream: SampleStream, multicrop: Callable, batch_size: int, prefetch: int, *,
                 device: torch.device | None = None, replay: ReplayStream | None = None,
                 full_batches: bool = False) -> None:
        super().__init__(name="streamssl-feeder", daemon=True)
        self.device = device if device is not None else torch.device("cpu")
        self.stream = stream
        self.replay = replay
        self.multicrop = multicrop
        self.batch_size = batch_size
        self.min_batch = batch_size if full_batches else 2
        self.out: queue.Queue = queue.Queue(maxsize=prefetch)
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.stream.close()

    def drain(self, stopping: Callable[[], bool], idle: Callable[[float], None]) -> Iterator[Batch]:
        """The batches, in order, until the feeder's end, or until ``stopping()`` while none is ready
        (``idle(seconds waited)`` is called every half second that none is)."""
        waiting_since: float | None = None
        while True:
            try:
                item = self.out.get(timeout=0.5)
            except queue.Empty:
                if stopping():
                    return
                waiting_since = time.monotonic() if waiting_since is None else waiting_since
                idle(time.monotonic() - waiting_since)
                continue
            waiting_since = None
            if item is END:
                return
            yield item

    def poll(self, timeout_s: float) -> Batch | object | None:
        """The next batch, ``END``, or None when none came within ``timeout_s`` (for ranks that step together)."""
        try:
            return self.out.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def _put(self, item: object) -> bool:
        while not self._stop_event.is_set():
            try:
                self.out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            use_device(self.device)  # torch's current CUDA device is per thread: DALI's copies land on ours
            samples = iter(self.replay if self.replay is not None else self.stream)
            exhausted = False
            while not self._stop_event.is_set() and not exhausted:
                parts: list[list[Tensor]] = []
                ids: list[str] = []
                have = 0
                while have < self.batch_size and not self._stop_event.is_set():
                    chunk, chunk_ids = [], []
                    for sample in samples:
                        chunk.append(sample.data)
                        chunk_ids.append(sample.id)
                        if len(chunk) == self.batch_size - have:
                            break
                    else:
                        exhausted = True
                    if chunk:
                        views, kept = self.multicrop(chunk)
                        if self.replay is not None and len(kept) < len(chunk):
                            self.replay.discard(set(chunk_ids) - {chunk_ids[k] for k in kept})
                        if kept:
                            parts.append(views)
                            ids += [chunk_ids[k] for k in kept]
                            have += len(kept)
                    if exhausted:
                        break
                if self._stop_event.is_set() or have < self.min_batch:
                    break
                views = [torch.cat(group) for group in zip(*parts, strict=True)] if len(parts) > 1 else parts[0]
                if not self._put(Batch(views, self.stream.state_dict(), ids)):
                    break
        except BaseException as exc:  # surfaced in the main thread
            self.error = exc
            log.exception("data feeder failed")
        finally:
            close = getattr(self.multicrop, "close", None)
            if close is not None:
                close()
            self._put(END)


def make_data_path(cfg: Config, device: torch.device, *, position: dict[str, Any] | None,
                   on_bad: Callable[[str], None], ack: Callable[[str], None], echo: Callable[[str], None],
                   replay_state: dict[str, Any] | None = None, world: World = ONE) -> tuple[SampleStream, Feeder]:
    """The run's data path, not yet started: its source (the embedded demo images when ``source.urls`` is empty),
    the sample stream from ``position`` (acknowledging shards through ``ack`` once a checkpoint covers
    them), the replay buffer when ``replay.policy`` is not none (refilled from ``replay_state``), the
    multi-crop on ``device`` and the feeder thread that batches its views. The caller starts the feeder once
    it holds the stream: ``ack`` may be called from the feeder's first samples on. Several ranks: this rank's
    share of the source (a Redis source: a consumer of its own in the group, ``<consumer>-rank<N>``)."""
    source_cfg, split = cfg.source, world  # how the source is shared among the ranks
    if not source_cfg.urls:
        from streamssl.stream.demo import demo_max_side, demo_shards

        side = demo_max_side(cfg.augment.sizes)
        # One shard: every rank reads all of it (cycled, in its own order), each packing its own copy.
        folder = f"demo-shards-{side}px" + (f"-rank{world.rank}" if world.distributed else "")
        pattern = demo_shards(os.path.join(cfg.checkpoint.dir, folder), max_side=side)
        split = ONE
        source_cfg = type(source_cfg)(**{**source_cfg.__dict__, "urls": (pattern,), "cycle": True})
        echo(f"no source.urls: streaming the embedded demo images ({pattern}), cycled")
    if world.distributed and source_cfg.consumer:
        source_cfg = type(source_cfg)(**{**source_cfg.__dict__, "consumer": f"{source_cfg.consumer}-rank{world.rank}"})
    source = make_source(source_cfg, rank=split.rank, world_size=split.size, tls=TLSFiles.of(cfg.store))
    stream = SampleStream(source, source_cfg, on_bad=on_bad, defer_ack=True, ack=ack)
    if position is not None:
        stream.load_state_dict(position)
    replay = None
    if cfg.replay.policy != "none":
        r = cfg.replay
        replay = ReplayStream(stream, ReplayBuffer(r.policy, r.max_samples, r.max_bytes, seed=r.seed),
                              ratio=r.ratio, min_fill=r.min_fill)
        if replay_state is not None:
            replay.load_state_dict(replay_state)
    multicrop = make_multicrop(cfg.augment, cfg.learner.batch_size, device=str(device), on_bad=on_bad)
    return stream, Feeder(stream, multicrop, cfg.learner.batch_size, cfg.augment.prefetch, device=device,
                          replay=replay, full_batches=world.distributed)


__all__ = ["END", "Batch", "Feeder", "make_data_path"]
