"""Prometheus metrics of a run, and the health rule; metrics_server.py serves them (/metrics, /healthz).

A leaf of the flow (docs/architecture.md): the daemon creates one ``CollectorRegistry``, builds ``Metrics`` on
it and feeds it plain numbers through the methods below; this module imports nothing of the learner, the daemon
or the store.
Names follow ``streamssl_<subsystem>_<name>_<unit>``; counters end in ``_total``; times are seconds; labels take
bounded values only (never keys or URLs). The names are an interface: the Grafana dashboard and the alert rules
in ``ops/`` use them, and ``tests/test_ops.py`` checks that every name used there exists here.

Metric (type; labels)                                   Meaning
streamssl_learner_images_total (counter)                images consumed by learner steps
streamssl_source_shards_total (counter)                 shards fully consumed
streamssl_samples_bad_total (counter; reason)           samples dropped, by reason (one of BAD_REASONS)
streamssl_learner_steps_total (counter)                 learner steps done, skipped ones included
streamssl_learner_skipped_steps_total (counter)         steps whose update was skipped (non-finite)
streamssl_learner_loss (gauge)                          the method's loss, last finite value
streamssl_learner_learning_rate (gauge)                 learning rate of the last step
streamssl_learner_step_seconds (histogram)              time of one learner step, data wait excluded
streamssl_learner_data_wait_seconds (histogram)         time waiting for the next batch of views
streamssl_learner_data_wait_ratio (gauge)               share of wall time spent waiting for data (0..1)
                                                        over the daemon's last progress interval
streamssl_learner_part_seconds (histogram; part)        time of one part of a step: the method's parts
                                                        (SwAV: forward, sinkhorn, loss), then backward,
                                                        optim, update
(the method's diagnostics: one gauge each, declared by the method; SwAV's:)
streamssl_learner_queue_fill_ratio (gauge)              queue fill, 0..1 (0 without a queue)
streamssl_learner_code_entropy_nats (gauge)             entropy of the batch's hard code histogram;
                                                        near 0 means collapse
streamssl_learner_prototypes_in_use (gauge)             distinct prototypes that are some sample's code
(SimCLR's, MoCo's, BYOL's and NPID's:)
streamssl_learner_embedding_std (gauge)                 spread of the unit embeddings across the batch;
                                                        near 0 means collapse
(NPID's:) streamssl_learner_memory_hit_ratio (gauge)    share of the batch already in the instance memory
streamssl_learner_prototype_drift (gauge)               mean (1 - cosine) between matching rows of the
                                                        last two published prototype versions
streamssl_learner_collapsed (gauge)                     1 while the daemon detects collapse, else 0
streamssl_learner_collapse_recoveries_total (counter)   collapse recoveries applied (rollback, re-freeze,
                                                        lower eps)
streamssl_learner_last_step_timestamp_seconds (gauge)   unix time of the last step (0: none yet)
streamssl_store_writes_total (counter)                  successful prototype store writes
streamssl_store_write_failures_total (counter)          failed prototype store writes
streamssl_store_lag_steps (gauge)                       steps since the version the store holds
streamssl_store_up (gauge)                              1 if the last store write succeeded, else 0
                                                        (0 before the first write)
streamssl_store_last_success_timestamp_seconds (gauge)  unix time of the last successful write (0: none)
streamssl_checkpoint_last_write_timestamp_seconds       unix time of the last checkpoint (0: none);
    (gauge)                                             checkpoint age is ``time() - this`` in PromQL
streamssl_checkpoint_write_failures_total (counter)     checkpoints that could not be written (disk full,
                                                        permissions); training goes on, retried next interval
streamssl_source_idle_seconds (gauge)                   how long the source has had no new shard (0 while
                                                        shards flow): a quiet folder or ingest stream
streamssl_probe_accuracy_ratio (gauge)                  online probe accuracy, 0..1
streamssl_probe_duration_seconds (gauge)                time the last online probe took (training paused)
streamssl_replay_samples (gauge)                        samples in the replay buffer (0: replay.policy none)
streamssl_replay_bytes (gauge)                          encoded bytes the replay buffer holds
streamssl_replay_fill_ratio (gauge)                     replay buffer samples / replay.max_samples, 0..1
streamssl_replay_redundancy (gauge)                     MinRed: mean cosine similarity of each buffered sample
                                                        to its nearest neighbour (1: duplicates)
streamssl_replay_draws_per_arrival (gauge)              replay ratio achieved: samples trained on per arrival
streamssl_replay_arrivals_total (counter)               samples that reached the replay buffer
streamssl_replay_evictions_total (counter)              samples the policy evicted to make room
streamssl_replay_refused_total (counter)                arrivals not kept (reservoir's draw, or too large)
streamssl_replay_draws_total (counter)                  samples drawn from the buffer for training
streamssl_daemon_start_timestamp_seconds (gauge)        unix time the metrics were created (run start);
                                                        alerts use it to spare a warming-up run
streamssl_build_info (info; version, arch, method,      always 1; streamssl version, trunk arch, method, and
  rank, world_size)                                     this process's rank of the job's (0 of 1 alone)

Histograms also expose ``_bucket``, ``_sum`` and ``_count``; counters and histograms ``_created``.

Health rule (/healthz): healthy when a step completed less than ``stall_s`` ago, or when no step completed yet
and the metrics were created less than ``stall_s`` ago (the run is warming up: model build, first shards).
Otherwise 503. The body is a short JSON object: status (ok, warming_up, stalled), steps, seconds since the last
step (null before the first) and stall_s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from streamssl import __version__
from streamssl.stream.reasons import BAD_REASONS as SAMPLE_REASONS
from streamssl.stream.reasons import OTHER

#: Reasons a sample can be dropped for (streamssl.stream.reasons), and "other" for anything else: labels stay bounded.
BAD_REASONS: tuple[str, ...] = (*SAMPLE_REASONS, OTHER)

# Bucket edges in seconds. A step runs from ~10 ms (tiny CPU model) to tens of seconds (large batch on CPU);
# waiting for data is ~0 when the pipeline keeps up; Sinkhorn is milliseconds unless K or the queue is huge.
STEP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PART_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  10.0)


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _ratio(x: float) -> float:
    """Clamp a share to [0, 1]: float sums can overshoot by an ulp."""
    return min(1.0, max(0.0, float(x)))


class Metrics:
    """Every metric of a run, registered on ``registry``; the daemon calls the methods with plain numbers.

    Gauges keep their last finite value: a non-finite loss (a skipped step) is told by the skipped-steps
    counter, not by a NaN that would break averages in dashboards.

    Args:
        registry: the registry to register on (one per daemon; a fresh one per test).
        arch: model trunk architecture for the build-info metric (``cfg.model.arch``).
        method: the method trained (``cfg.learner.method``), also in the build-info metric.
        diagnostics: the method's diagnostics as (key, gauge name, help): one gauge each, fixed for the run.
        parts: the names of a step's timed parts (the ``part`` label's values).
        clock: monotonic clock for the health rule (injectable for tests).
    """

    def __init__(self, registry: CollectorRegistry, *, arch: str = "unknown", method: str = "swav",
                 diagnostics: Sequence[tuple[str, str, str]] = (), parts: Sequence[str] = (),
                 rank: int = 0, world_size: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self._clock = clock
        self._started = clock()
        self._last_step: float | None = None  # clock() of the last completed step
        self._n_steps = 0
        r = registry

        self.images = Counter("streamssl_learner_images", "Images consumed by learner steps (skipped steps too).",
                              registry=r)
        self.shards = Counter("streamssl_source_shards", "Shards fully consumed.", registry=r)
        self.bad_samples = Counter("streamssl_samples_bad", "Samples dropped before training, by reason. Watch "
                                   "corrupt/decode_error for a broken producer, refused_url for a hostile one.",
                                   ["reason"], registry=r)
        for reason in BAD_REASONS:  # every series exists from the start, so rate() sees the first increment
            self.bad_samples.labels(reason)
        self.steps = Counter("streamssl_learner_steps", "Learner steps done, skipped ones included.", registry=r)
        self.skipped_steps = Counter("streamssl_learner_skipped_steps", "Steps whose update was skipped because "
                                     "the loss or gradients were not finite.", registry=r)
        self.loss = Gauge("streamssl_learner_loss", "The method's loss (SwAV: swapped prediction) of the last step "
                          "with a finite loss.",
                          registry=r)
        self.learning_rate = Gauge("streamssl_learner_learning_rate", "Learning rate of the last step.", registry=r)
        self.step_time = Histogram("streamssl_learner_step_seconds", "Time of one learner step (forward, Sinkhorn, "
                                   "backward, optimizer), waiting for data excluded.", buckets=STEP_BUCKETS_S,
                                   registry=r)
        self.data_wait = Histogram("streamssl_learner_data_wait_seconds", "Time the learner waited for the next "
                                   "batch of views. High: the input pipeline is the bottleneck.",
                                   buckets=WAIT_BUCKETS_S, registry=r)
        self.data_wait_share = Gauge("streamssl_learner_data_wait_ratio", "Share of wall time spent waiting for "
                                     "data over the last progress interval, 0..1.", registry=r)
        self.part_time = Histogram("streamssl_learner_part_seconds", "Time of one part of a learner step (the "
                                   "method's parts, then backward, optim, update).", ["part"],
                                   buckets=PART_BUCKETS_S, registry=r)
        self._parts = {name: self.part_time.labels(name) for name in parts}
        # The method's diagnostics, declared up front: (key, metric name, help). Ratios are clamped to 0..1.
        self._diagnostics = {key: (Gauge(metric, help, registry=r), metric.endswith("_ratio"))
                             for key, metric, help in diagnostics}
        self.drift = Gauge("streamssl_learner_prototype_drift", "Mean (1 - cosine) between matching prototypes of "
                           "the last two published versions; 0 means frozen.", registry=r)
        self.collapsed = Gauge("streamssl_learner_collapsed", "1 while the daemon detects collapse, else 0.",
                               registry=r)
        self.last_step_time = Gauge("streamssl_learner_last_step_timestamp_seconds", "Unix time of the last "
                                    "completed step; 0 before the first.", registry=r)
        self.store_writes = Counter("streamssl_store_writes", "Successful prototype store writes.", registry=r)
        self.store_failures = Counter("streamssl_store_write_failures", "Failed prototype store writes (training "
                                      "goes on; the store catches up on reconnect).", registry=r)
        self.store_lag = Gauge("streamssl_store_lag_steps", "Steps between the learner and the prototype version "
                               "the store holds.", registry=r)
        self.store_up = Gauge("streamssl_store_up", "1 if the last prototype store write succeeded, 0 if it failed "
                              "or none was tried yet.", registry=r)
        self.store_last_success = Gauge("streamssl_store_last_success_timestamp_seconds", "Unix time of the last "
                                        "successful prototype store write; 0 before the first.", registry=r)
        self.checkpoint_time = Gauge("streamssl_checkpoint_last_write_timestamp_seconds", "Unix time of the last "
                                     "checkpoint written; 0 before the first. Age: time() - this.", registry=r)
        self.checkpoint_failures = Counter("streamssl_checkpoint_write_failures", "Checkpoints that could not be "
                                           "written (disk full, permissions); retried at the next interval.",
                                           registry=r)
        self.source_idle = Gauge("streamssl_source_idle_seconds", "Seconds the source has had no new shard "
                                 "(0 while shards flow).", registry=r)
        self.probe_acc = Gauge("streamssl_probe_accuracy_ratio", "Online probe accuracy, 0..1.", registry=r)
        self.probe_time = Gauge("streamssl_probe_duration_seconds", "Time the last online probe took; training "
                                "waits for it. Lower probe.limit_train/limit_test if it grows.", registry=r)
        self.recoveries = Counter("streamssl_learner_collapse_recoveries", "Collapse recoveries applied: rollback "
                                  "to the last healthy snapshot, prototypes re-frozen, eps lowered for a while.",
                                  registry=r)
        self._replay_gauges = {key: Gauge(f"streamssl_replay_{name}", help, registry=r) for key, name, help in (
            ("samples", "samples", "Samples in the replay buffer (0 without replay)."),
            ("bytes", "bytes", "Encoded bytes the replay buffer holds."),
            ("fill", "fill_ratio", "Replay buffer samples / replay.max_samples, 0..1."),
            ("redundancy", "redundancy", "MinRed: mean cosine similarity of each buffered sample to its nearest "
             "neighbour; near 1, the buffer holds near-duplicates."),
            ("ratio", "draws_per_arrival", "Replay ratio achieved: samples trained on per sample arrived."))}
        self._replay_counters = {key: Counter(f"streamssl_replay_{name}", help, registry=r) for key, name, help in (
            ("added", "arrivals", "Samples that reached the replay buffer."),
            ("evicted", "evictions", "Samples the replay policy evicted to make room."),
            ("refused", "refused", "Arrivals the replay buffer did not keep (reservoir's draw, or too large)."),
            ("drawn", "draws", "Samples drawn from the replay buffer for training."))}
        self._replay_last: dict[str, float] | None = None  # the counters' values at the last call
        self.start_time = Gauge("streamssl_daemon_start_timestamp_seconds", "Unix time this run's metrics were "
                                "created.", registry=r)
        self.start_time.set(time.time())
        self.build = Info("streamssl_build", "streamssl version, model trunk architecture, method, and this "
                          "process's rank of the job's world_size.", registry=r)
        self.build.info({"version": __version__, "arch": arch, "method": method, "rank": str(rank),
                         "world_size": str(world_size)})

    # -- called by the daemon ------------------------------------------------------------------------------

    def observe_step(self, *, n_images: int, loss: float, lr: float, step_s: float, data_wait_s: float,
                     skipped: bool, diagnostics: Mapping[str, float] | None = None,
                     parts: Mapping[str, float] | None = None) -> None:
        """Record one completed learner step.

        Args:
            n_images: images in the batch (B).
            loss: the method's loss; a non-finite value leaves the loss gauge unchanged.
            lr: learning rate used.
            step_s: learner step time, data wait excluded.
            data_wait_s: time spent waiting for this step's views.
            skipped: the update was skipped (non-finite loss or gradients).
            diagnostics: the method's numbers by key; keys not declared at construction are ignored.
            parts: seconds per part of the step; parts not declared at construction are ignored.
        """
        self.steps.inc()
        self.images.inc(max(0, int(n_images)))
        if skipped:
            self.skipped_steps.inc()
        for gauge, value in ((self.loss, loss), (self.learning_rate, lr)):
            if _finite(value):
                gauge.set(value)
        for key, value in (diagnostics or {}).items():
            if key in self._diagnostics and _finite(value):
                gauge, ratio = self._diagnostics[key]
                gauge.set(_ratio(value) if ratio else value)
        observed = [(self.step_time, step_s), (self.data_wait, data_wait_s)]
        observed += [(self._parts[k], v) for k, v in (parts or {}).items() if k in self._parts]
        for hist, seconds in observed:
            if _finite(seconds):
                hist.observe(max(0.0, seconds))
        self.last_step_time.set(time.time())
        self._last_step = self._clock()
        self._n_steps += 1

    def set_data_wait_share(self, x: float) -> None:
        """Share of wall time spent waiting for data over the last interval (clamped to 0..1)."""
        if _finite(x):
            self.data_wait_share.set(_ratio(x))

    def bad_sample(self, reason: str, n: int = 1) -> None:
        """Count ``n`` dropped samples; a reason outside ``BAD_REASONS`` counts as "other"."""
        label = reason if reason in BAD_REASONS else OTHER
        if n > 0:
            self.bad_samples.labels(label).inc(n)

    def shard_done(self, n: int = 1) -> None:
        """Count ``n`` shards fully consumed."""
        if n > 0:
            self.shards.inc(n)

    def store_result(self, ok: bool, lag_steps: int) -> None:
        """Record one prototype store write attempt and the lag of the stored version, in steps."""
        if ok:
            self.store_writes.inc()
            self.store_up.set(1)
            self.store_last_success.set(time.time())
        else:
            self.store_failures.inc()
            self.store_up.set(0)
        self.store_lag.set(max(0, int(lag_steps)))

    def prototype_drift(self, value: float) -> None:
        """Mean (1 - cosine) between the last two published prototype versions."""
        if _finite(value):
            self.drift.set(value)

    def checkpoint_written(self, unix_s: float) -> None:
        """A checkpoint was written (or found on resume) at unix time ``unix_s``."""
        self.checkpoint_time.set(unix_s)

    def checkpoint_failed(self) -> None:
        self.checkpoint_failures.inc()

    def set_source_idle(self, seconds: float) -> None:
        self.source_idle.set(max(0.0, seconds))

    def probe_accuracy(self, value: float, seconds: float | None = None) -> None:
        """Online probe accuracy as a fraction (ValueError outside 0..1: a percentage by mistake), and how long
        the probe took."""
        if not (_finite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"probe accuracy must be a fraction in [0, 1], got {value!r}")
        self.probe_acc.set(value)
        if seconds is not None and _finite(seconds):
            self.probe_time.set(max(0.0, seconds))

    def replay(self, snapshot: Mapping[str, float]) -> None:
        """The replay buffer's state (``ReplayStream.snapshot()``). Its counters are cumulative over the buffer's
        life, checkpoints included: the first call is this process's baseline, later ones add what grew."""
        for key, gauge in self._replay_gauges.items():
            if _finite(snapshot[key]):
                gauge.set(_ratio(snapshot[key]) if key == "fill" else snapshot[key])
        if self._replay_last is not None:
            for key, counter in self._replay_counters.items():
                counter.inc(max(0.0, snapshot[key] - self._replay_last[key]))
        self._replay_last = {key: snapshot[key] for key in self._replay_counters}

    def collapse_recovered(self) -> None:
        """Count one collapse recovery."""
        self.recoveries.inc()

    def collapse(self, active: bool) -> None:
        """Set or clear the collapse flag."""
        self.collapsed.set(1 if active else 0)

    # -- read by the server --------------------------------------------------------------------------------

    def health(self, stall_s: float) -> tuple[bool, dict[str, Any]]:
        """(healthy, JSON-able details) by the rule in the module docstring."""
        now = self._clock()
        if self._last_step is None:
            age = None
            healthy = now - self._started < stall_s
            status = "warming_up" if healthy else "stalled"
        else:
            age = now - self._last_step
            healthy = age < stall_s
            status = "ok" if healthy else "stalled"
        return healthy, {"status": status, "steps": self._n_steps,
                         "last_step_age_s": None if age is None else round(age, 3), "stall_s": stall_s}


__all__ = ["BAD_REASONS", "Metrics"]
