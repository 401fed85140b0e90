"""The long-running service: shards in, training steps out, state kept safe, health visible.

Wires the stages of docs/architecture.md:

    source -> samples -> augment      (feeder.py's thread: full batches of views, each tagged with the stream
                                       position after it, prefetched so the learner never waits when the
                                       data path is faster than the model)
    learner                           (the main thread: one step of the method per batch)
    store, checkpoint, metrics        (cadences owned here: prototypes every N steps, checkpoints every N
                                       steps or T seconds, heartbeats, one progress line per interval:
                                       progress.py; whether a checkpoint fits this run: resume.py)

Signals: SIGTERM/SIGINT finish the current step, write a checkpoint and the prototypes, ack the shards the
checkpoint covers, and exit 0; a second signal exits at once. The position saved with a checkpoint is the one
after the last *trained* batch, so prefetched batches are read again after a restart (at least once).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from torch import Tensor

from streamssl import distributed
from streamssl.config import Config
from streamssl.devices import pick_device, use_device
from streamssl.distributed import world_from_env
from streamssl.errors import RuntimeFailure, StreamsslError
from streamssl.learner.engine import ENGINE_PARTS, Learner, StepStats
from streamssl.learner.methods import method_settings
from streamssl.service.checkpoint import (
    CheckpointManager,
)
from streamssl.service.feeder import Batch, Feeder, make_data_path
from streamssl.service.metrics import Metrics
from streamssl.service.metrics_server import MetricsServer
from streamssl.service.probe import LiveProbe
from streamssl.service.progress import History, ProgressWindow, format_progress
from streamssl.service.ranks import StepGate
from streamssl.service.recovery import CollapseRecovery, NonFiniteStreak
from streamssl.service.run_state import RunState
from streamssl.store import BackgroundWriter, open_store
from streamssl.stream.replay import ReplayStream
from streamssl.stream.samples import SampleStream

log = logging.getLogger("streamssl.service.daemon")


class DataPathFailed(RuntimeFailure):
    """The feeder thread (source, samples, augment) stopped on an unexpected error."""


@dataclass
class RunSummary:
    steps: int
    images: int
    seconds: float
    last_loss: float
    skipped_steps: int
    stopped_by_signal: bool
    checkpoint: str | None = None
    bad_samples: dict[str, int] = field(default_factory=dict)
    error: BaseException | None = None  # why the run stopped early, after shutting down cleanly


class Daemon(RunState):
    """Streams shards through the learner until a limit or a signal, keeping state safe and visible.

    Args:
        cfg: the resolved configuration.
        registry: Prometheus registry for this run (a fresh one by default).
        views: an iterator of view batches that replaces the whole data path (tests, benchmarks).
        echo: where progress lines go.
    """

    def __init__(self, cfg: Config, *, registry: CollectorRegistry | None = None,
                 views: Iterator[list[Tensor]] | None = None, echo: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.world = world_from_env()  # torchrun's RANK, WORLD_SIZE, LOCAL_RANK; one process without them
        main = self.world.is_main
        self.echo = echo if main else (lambda line: log.debug("rank %d: %s", self.world.rank, line))
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.device = pick_device(cfg.run.device)  # cuda always with its index: DALI and the feeder use it
        if self.world.distributed and self.device.type == "cuda" and ":" not in cfg.run.device:
            self.device = torch.device("cuda", self.world.local_rank)  # one GPU per rank on its machine
        use_device(self.device)
        distributed.init(self.world, self.device, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
        self.checkpoints = CheckpointManager(cfg.checkpoint.dir, keep=cfg.checkpoint.keep)
        if self.world.is_main:  # rank 0 alone reads and writes checkpoint.dir; the other ranks never touch it
            self.checkpoints.prepare()  # a folder that cannot hold checkpoints stops the run now, not at its end
        self.learner = Learner.build(cfg.model, cfg.learner, device=self.device, settings=method_settings(cfg),
                                     sync_bn=cfg.dist.sync_bn)
        method = self.learner.method
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry, arch=cfg.model.arch, method=cfg.learner.method,
                               parts=method.parts + ENGINE_PARTS,
                               diagnostics=[(d.name, d.metric, d.help) for d in method.diagnostics],
                               rank=self.world.rank, world_size=self.world.size)
        self.learner_id = f"{socket.gethostname()}-{os.getpid()}"
        # Rank 0 alone writes the store, checkpoints and history; the other ranks hold no store at all.
        self.writer: BackgroundWriter | None = None
        if main:
            store = open_store(cfg.store, local_dir=os.path.join(cfg.checkpoint.dir, "store"), writer=self.learner_id)
            self.writer = BackgroundWriter(store, on_result=self._on_store_result, max_backoff_s=cfg.store.retry_max_s)
        self.bad = Counter[str]()
        self._views = views
        self.stream: SampleStream | None = None
        self.feeder: Feeder | None = None
        self.images = 0
        self.position: dict[str, Any] | None = None
        self.replay: ReplayStream | None = None  # the feeder's replay stage, when replay.policy is not none
        self._replay_state: dict[str, Any] | None = None  # a checkpoint's buffer, until the data path takes it
        self.server: MetricsServer | None = None
        self._signals = 0
        self.error: BaseException | None = None  # set when the run stops on an error after a clean shutdown
        self._write_final_checkpoint = True
        self.last_checkpoint_error: BaseException | None = None
        self._last_ckpt_time = time.monotonic()
        self._last_ckpt_step = -1
        self._idle_ckpt_step = -1  # the step of the last idle checkpoint tried
        self._last_ckpt_path: str | None = None
        self._last_heartbeat = 0.0
        self._published: Tensor | None = None
        self.history = History(os.path.join(cfg.checkpoint.dir, "history.jsonl") if main else os.devnull)
        self.recovery = CollapseRecovery(cfg, self.learner, self.metrics, self.history)
        self.nonfinite = NonFiniteStreak(cfg, self.echo, self.history)
        self.probe: LiveProbe | None = None
        if cfg.probe.dataset and main:
            self.probe = LiveProbe(cfg.probe, size=cfg.augment.sizes[0], mean=cfg.augment.mean,
                                   std=cfg.augment.std, device=self.device)

    # ------------------------------------------------------------------ wiring

    def _on_store_result(self, ok: bool, seconds: float) -> None:
        assert self.writer is not None
        self.metrics.store_result(ok, self.writer.lag_steps)

    def _on_bad(self, reason: str) -> None:
        self.bad[reason] += 1
        self.metrics.bad_sample(reason)

    def _data(self, start: float) -> StepGate | None:
        """The gate every step's batch passes (ranks agree on it: ranks.py); None with ``views`` given."""
        if self._views is not None:
            return None
        self.stream, self.feeder = make_data_path(self.cfg, self.device, position=self.position,
                                                  on_bad=self._on_bad, ack=self._ack, echo=self.echo,
                                                  replay_state=self._replay_state, world=self.world)
        self.replay, self._replay_state = self.feeder.replay, None
        if self.replay is not None:
            self.metrics.replay(self.replay.snapshot())  # the counters' baseline: what a checkpoint brought
        self.feeder.start()  # after self.stream is set: the feeder's first samples may ack a shard
        cfg = self.cfg
        return StepGate(self.feeder, self.world, self._drain(self.feeder), start=start,
                        wait_log_s=cfg.dist.wait_log_s, stopping=lambda: bool(self._signals) or (
                            bool(cfg.run.max_seconds) and time.monotonic() - start >= cfg.run.max_seconds),
                        due=lambda: time.monotonic() - self._last_ckpt_time > cfg.checkpoint.every_s,
                        idle=self._idle, device=self.device)

    def _idle(self, waited_s: float) -> None:
        """While no batch comes: the source's idle time in the metrics and, once the stream has been quiet for
        ``checkpoint.idle_s`` after steps not yet checkpointed, one checkpoint: a quiet stream then holds no
        learning at risk, and the shards it trained are acknowledged (acks follow checkpoints). Ranks: the
        job's wait and step, the same everywhere, so all ranks write it together."""
        if self.stream is not None:
            self.metrics.set_source_idle(self.stream.idle_seconds())
        step, idle_s = self.learner.step_count, self.cfg.checkpoint.idle_s
        if idle_s and waited_s >= idle_s and step > 0 and step not in (self._last_ckpt_step, self._idle_ckpt_step):
            self._idle_ckpt_step = step  # once per quiet spell, written or failed
            self.checkpoint()

    def _ack(self, url: str) -> None:
        assert self.stream is not None
        self.stream.source.mark_done(url)
        self.metrics.shard_done()

    def _drain(self, feeder: Feeder) -> Iterator[Batch]:
        yield from feeder.drain(lambda: bool(self._signals), self._idle)
        self._feeder_failed()

    def _feeder_failed(self) -> None:
        feeder = self.feeder
        if feeder is not None and feeder.error is not None:  # stopped as on SIGTERM, then reported
            exc = feeder.error
            self.error = exc if isinstance(exc, StreamsslError) else DataPathFailed(
                f"the data path failed: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ loop

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            last = self._last_ckpt_path or "none yet"
            os.write(2, f"second signal: exiting now without a final checkpoint; the last checkpoint ({last}) is "
                        "intact and a restart resumes from it\n".encode())
            os._exit(128 + signum)
        log.warning("signal %s: finishing the current step, then checkpointing and stopping "
                    "(send it again to exit at once)", signal.Signals(signum).name)
        if self.feeder is not None:
            self.feeder.stop()

    def _start_server(self) -> None:
        if self.cfg.metrics.port < 0:
            return
        port = self.cfg.metrics.port
        if port > 0:
            port += self.world.local_rank  # one /metrics per rank on a machine: port, port + 1, ...
        self.server = MetricsServer(self.metrics, self.registry, host=self.cfg.metrics.host, port=port,
                                    stall_s=self.cfg.metrics.stall_s)
        self.echo(f"metrics on http://{self.cfg.metrics.host}:{self.server.port}/metrics "
                  f"(health: /healthz)")

    def budget_used(self, elapsed_s: float) -> float | None:
        """Fraction of the run's budget used: the largest over run.max_steps, max_images and max_seconds,
        capped at 1 (the loop stops there), or None for an unbounded run."""
        run = self.cfg.run
        used = [done / limit for done, limit in ((self.learner.step_count, run.max_steps),
                                                 (self.images, run.max_images), (elapsed_s, run.max_seconds))
                if limit]
        return min(max(used), 1.0) if used else None

    def run(self) -> RunSummary:
        """Train until a limit, a signal or an error; shut down cleanly either way.

        A clean stop (limit, signal, the data path failing) writes a final checkpoint and the prototypes,
        acks the shards the checkpoint covers and closes the store writer and the metrics server; an error
        that stopped it is in ``RunSummary.error``. A run of non-finite steps stops without a checkpoint
        (nothing was learned since the last one). The signal handlers stay until everything is closed, so
        a second signal during the final checkpoint exits at once, leaving the previous checkpoint intact.
        """
        in_main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
        start = time.monotonic()
        try:
            stats, n_images_run = self._loop(start)
            path = self._last_ckpt_path
            if self._write_final_checkpoint:
                path = self._final_checkpoint(path)
            self.publish_prototypes()
            self.heartbeat(stats)
            if self.writer is not None and not self.writer.flush(timeout_s=10.0):
                log.warning("the prototype store did not take the final prototypes within 10 s")
        finally:
            self.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return RunSummary(steps=self.learner.step_count, images=n_images_run, seconds=time.monotonic() - start,
                          last_loss=stats.loss if stats else math.nan, skipped_steps=self.learner.n_skipped,
                          stopped_by_signal=bool(self._signals), checkpoint=path, bad_samples=dict(self.bad),
                          error=self.error)

    def _loop(self, start: float) -> tuple[StepStats | None, int]:
        cfg = self.cfg
        stats: StepStats | None = None
        n_images_run = 0
        try:
            self.restore()
            self._start_server()
            self.heartbeat(None)
            gate = self._data(start)
            views = (Batch(v) for v in self._views) if self._views is not None else None
            ranks = self.world.distributed  # then the gate stops every rank at the same step (ranks.py)
            window = ProgressWindow()
            while ranks or not self._signals:
                # ranks: steps and images are the job's on every rank, the clock is agreed in the gate
                used = self.budget_used(0.0 if ranks else time.monotonic() - start)
                if used is not None and used >= 1.0:
                    break
                t = time.monotonic()
                batch = gate.next() if gate is not None else next(views, None)  # type: ignore[arg-type]
                wait_s = time.monotonic() - t
                if batch is None:
                    break
                elapsed = gate.elapsed_s if gate is not None else time.monotonic() - start
                used = self.budget_used(elapsed)  # ranks: the job's clock, the same on every rank
                if ranks and used is not None and used >= 1.0:
                    break
                stats = self.learner.step(batch.views, progress=used, ids=batch.ids)
                if batch.position is not None:
                    self.position = batch.position
                if self.replay is not None and stats.embeddings is not None and batch.ids:
                    self.replay.update_embeddings(batch.ids, stats.embeddings)  # MinRed's; the others ignore them
                self.images += stats.all_images  # every rank's: budgets and resume count the job's images
                n_images_run += stats.all_images
                window.add(stats.n_images, wait_s)
                self.metrics.observe_step(n_images=stats.n_images, loss=stats.loss, lr=stats.lr,
                                          step_s=stats.total_s, data_wait_s=wait_s, skipped=stats.skipped,
                                          diagnostics=stats.diagnostics, parts=stats.times)
                if self.stream is not None:
                    self.metrics.set_source_idle(self.stream.idle_seconds())
                step = stats.step
                if stats.skipped:
                    error = self.nonfinite.skipped(stats, self.learner.n_skipped, self._last_ckpt_path)
                    if error is not None:  # nothing learned since the last checkpoint: do not write one
                        self._write_final_checkpoint, self.error = False, error
                        break
                    continue
                self.nonfinite.reset()
                if step % cfg.run.log_every_steps == 0:
                    images_per_s, wait_share = window.close()
                    self.metrics.set_data_wait_share(wait_share)
                    if self.replay is not None:
                        self.metrics.replay(self.replay.snapshot())
                    self.echo(format_progress(stats, images_per_s, wait_share,
                                              self.learner.method.diagnostics, self.learner.n_skipped,
                                              limits={"prototypes_in_use": f"/{cfg.model.n_prototypes}"}))
                    self.history.write(stats, images=self.images, images_per_s=images_per_s, data_wait=wait_share,
                                       skipped_steps=self.learner.n_skipped)
                self.recovery.watch(stats)
                if self.probe is not None and step % cfg.probe.every_steps == 0:
                    self.run_probe()
                if step % cfg.store.every_steps == 0:
                    self.publish_prototypes()
                if time.monotonic() - self._last_heartbeat > cfg.store.heartbeat_ttl_s / 3:
                    self.heartbeat(stats)
                time_due = (gate.checkpoint_due if ranks and gate is not None
                            else time.monotonic() - self._last_ckpt_time > cfg.checkpoint.every_s)
                if step != self._last_ckpt_step and (step % cfg.checkpoint.every_steps == 0 or time_due):
                    self.checkpoint()
            self._feeder_failed()
        finally:
            if self.feeder is not None:
                self.feeder.stop()
        return stats, n_images_run

    def close(self) -> None:
        if self.feeder is not None:
            self.feeder.stop()
            self.feeder.join(timeout=10)
        if self.writer is not None:
            self.writer.close()
        self.history.close()
        if self.server is not None:
            self.server.close()
        if self.world.distributed:
            distributed.shutdown()
