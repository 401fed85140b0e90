"""metrics.py: every metric moves when the daemon's method is called, names follow the house convention, and the
HTTP server answers /metrics, /healthz (by the documented rule) and 404 over real loopback HTTP."""

from __future__ import annotations

import ast
import json
import math
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from streamssl import __version__
from streamssl.learner.engine import ENGINE_PARTS
from streamssl.learner.methods.swav import SwAV
from streamssl.service import metrics as metrics_module
from streamssl.service.metrics import BAD_REASONS, Metrics
from streamssl.service.metrics_server import MetricsServer
from streamssl.stream.reasons import BAD_REASONS as SAMPLE_REASONS

# SwAV's diagnostics and parts, as the daemon declares them for a SwAV run
DIAGNOSTICS = [(d.name, d.metric, d.help) for d in SwAV.diagnostics]
PARTS = (*SwAV.parts, *ENGINE_PARTS)
STEP = {"n_images": 64, "loss": 7.5, "lr": 0.002, "step_s": 0.4, "data_wait_s": 0.05, "skipped": False,
        "diagnostics": {"code_entropy": 3.9, "prototypes_in_use": 57, "queue_fill": 0.25},
        "parts": {"sinkhorn": 0.002, "forward": 0.1}}


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry, arch="resnet18", diagnostics=DIAGNOSTICS, parts=PARTS)


def value(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    v = registry.get_sample_value(name, labels or {})
    assert v is not None, f"no sample {name}{labels or ''}"
    return v


def get(url: str, accept: str | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body); HTTP errors are answers too. Never waits more than 5 s."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


# -- values ------------------------------------------------------------------------------------------------


def test_observe_step_sets_every_step_metric(registry: CollectorRegistry, metrics: Metrics) -> None:
    before = time.time()
    metrics.observe_step(**STEP)
    metrics.observe_step(**{**STEP, "n_images": 32, "loss": 7.0, "step_s": 0.6})
    assert value(registry, "streamssl_learner_images_total") == 96
    assert value(registry, "streamssl_learner_steps_total") == 2
    assert value(registry, "streamssl_learner_skipped_steps_total") == 0
    assert value(registry, "streamssl_learner_loss") == 7.0  # the last step's
    assert value(registry, "streamssl_learner_learning_rate") == pytest.approx(0.002)
    assert value(registry, "streamssl_learner_code_entropy_nats") == pytest.approx(3.9)
    assert value(registry, "streamssl_learner_prototypes_in_use") == 57
    assert value(registry, "streamssl_learner_queue_fill_ratio") == pytest.approx(0.25)
    assert value(registry, "streamssl_learner_step_seconds_count") == 2
    assert value(registry, "streamssl_learner_step_seconds_sum") == pytest.approx(1.0)
    assert value(registry, "streamssl_learner_step_seconds_bucket", {"le": "0.5"}) == 1
    assert value(registry, "streamssl_learner_data_wait_seconds_sum") == pytest.approx(0.1)
    assert value(registry, "streamssl_learner_part_seconds_count", {"part": "sinkhorn"}) == 2
    assert value(registry, "streamssl_learner_part_seconds_sum", {"part": "sinkhorn"}) == pytest.approx(0.004)
    assert value(registry, "streamssl_learner_part_seconds_count", {"part": "backward"}) == 0  # not reported
    assert before <= value(registry, "streamssl_learner_last_step_timestamp_seconds") <= time.time()


def test_skipped_step_counts_and_keeps_the_last_finite_gauges(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.observe_step(**STEP)
    metrics.observe_step(**{**STEP, "loss": math.nan, "diagnostics": {"code_entropy": math.inf}, "skipped": True})
    assert value(registry, "streamssl_learner_steps_total") == 2
    assert value(registry, "streamssl_learner_skipped_steps_total") == 1
    assert value(registry, "streamssl_learner_images_total") == 128  # the batch was consumed all the same
    assert value(registry, "streamssl_learner_loss") == 7.5
    assert value(registry, "streamssl_learner_code_entropy_nats") == pytest.approx(3.9)


def test_ratios_are_clamped_to_0_1(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.observe_step(**{**STEP, "diagnostics": {"queue_fill": 1.0000001}})
    assert value(registry, "streamssl_learner_queue_fill_ratio") == 1.0
    metrics.set_data_wait_share(0.3)
    assert value(registry, "streamssl_learner_data_wait_ratio") == pytest.approx(0.3)
    metrics.set_data_wait_share(-1e-9)
    assert value(registry, "streamssl_learner_data_wait_ratio") == 0.0
    metrics.set_data_wait_share(math.nan)  # ignored
    assert value(registry, "streamssl_learner_data_wait_ratio") == 0.0


def test_bad_samples_by_reason_with_unknown_reasons_as_other(registry: CollectorRegistry, metrics: Metrics) -> None:
    name = "streamssl_samples_bad_total"
    for reason in BAD_REASONS:  # every series exists at 0 from the start
        assert value(registry, name, {"reason": reason}) == 0
    metrics.bad_sample("corrupt")
    metrics.bad_sample("too_large", n=3)
    metrics.bad_sample("cosmic_ray")
    metrics.bad_sample("https://example.invalid/shard-000.tar", n=2)  # never a label value
    assert value(registry, name, {"reason": "corrupt"}) == 1
    assert value(registry, name, {"reason": "too_large"}) == 3
    assert value(registry, name, {"reason": "other"}) == 3
    assert registry.get_sample_value(name, {"reason": "cosmic_ray"}) is None
    reasons = {s.labels["reason"] for fam in registry.collect() if fam.name == "streamssl_samples_bad"
               for s in fam.samples if s.name == name}
    # one series per reason of the shared list (which the test below checks against the code), and "other"
    assert reasons == {*SAMPLE_REASONS, "other"}
    for reason in set(SAMPLE_REASONS) - {"corrupt", "too_large"}:
        metrics.bad_sample(reason)
        assert value(registry, name, {"reason": reason}) == 1, reason


def emitted_reasons() -> set[str]:
    """Every literal reason the package passes to an on_bad-style callback, read from its source."""
    import re
    from pathlib import Path

    import streamssl

    call = re.compile(r"""\b(?:on_bad|_on_bad|_bad)\(\s*["']([a-z_]+)["']""")
    default = re.compile(r"""\b(?:on_bad|_on_bad|_bad)\(\s*reason or ["']([a-z_]+)["']""")
    found: set[str] = set()
    for path in Path(streamssl.__file__).parent.rglob("*.py"):
        text = path.read_text()
        found |= set(call.findall(text)) | set(default.findall(text))
    return found


def test_every_reason_the_code_emits_is_a_label() -> None:
    from streamssl.stream.images import check_image

    found = emitted_reasons()
    assert {"augment_error", "decode_error", "shard_error", "refused_url", "unsupported"} <= found
    # reasons check_image returns (passed on as on_bad(reason)) are labels too
    for data in (b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\0" * 20, b"\x89PNG\r\n\x1a\n" + b"\0" * 30):
        checked, reason = check_image(data, "jpg", max_pixels=1000)
        assert checked is None and reason in SAMPLE_REASONS, (data[:8], reason)
        found.add(reason)
    assert found <= set(SAMPLE_REASONS) and set(BAD_REASONS) == {*SAMPLE_REASONS, "other"}


def test_store_results(registry: CollectorRegistry, metrics: Metrics) -> None:
    assert value(registry, "streamssl_store_up") == 0  # before the first write
    metrics.store_result(True, lag_steps=0)
    assert value(registry, "streamssl_store_up") == 1
    assert value(registry, "streamssl_store_writes_total") == 1
    assert value(registry, "streamssl_store_last_success_timestamp_seconds") == pytest.approx(time.time(), abs=5)
    last_ok = value(registry, "streamssl_store_last_success_timestamp_seconds")
    metrics.store_result(False, lag_steps=150)
    metrics.store_result(False, lag_steps=200)
    assert value(registry, "streamssl_store_up") == 0
    assert value(registry, "streamssl_store_write_failures_total") == 2
    assert value(registry, "streamssl_store_lag_steps") == 200
    assert value(registry, "streamssl_store_last_success_timestamp_seconds") == last_ok  # failures leave it
    metrics.store_result(True, lag_steps=0)
    assert value(registry, "streamssl_store_up") == 1
    assert value(registry, "streamssl_store_lag_steps") == 0


def test_probe_accuracy_is_a_fraction(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.probe_accuracy(0.875)
    assert value(registry, "streamssl_probe_accuracy_ratio") == 0.875
    with pytest.raises(ValueError, match="fraction"):
        metrics.probe_accuracy(87.5)
    assert value(registry, "streamssl_probe_accuracy_ratio") == 0.875


def test_build_info_and_start_time(registry: CollectorRegistry) -> None:
    before = time.time()
    Metrics(registry, arch="resnet50", method="byol")
    assert value(registry, "streamssl_build_info", {"version": __version__, "arch": "resnet50", "method": "byol",
                                                   "rank": "0", "world_size": "1"}) == 1
    assert before <= value(registry, "streamssl_daemon_start_timestamp_seconds") <= time.time()


# Each method the daemon calls, and the samples it must move. Together they must cover every metric family
# (checked below), so a new metric without a method (or without a line here) fails.
REPLAY_SNAPSHOT = {"samples": 10, "bytes": 100, "fill": 0.5, "added": 500, "refused": 3, "evicted": 490,
                   "drawn": 400, "ratio": 0.8, "redundancy": 0.6}
REPLAY_GREW = {"added": 520, "refused": 4, "evicted": 505, "drawn": 440}
CALLS: list[tuple[str, Callable[[Metrics], Any], list[tuple[str, dict[str, str]]]]] = [
    ("observe_step", lambda m: m.observe_step(**{**STEP, "skipped": True}), [
        ("streamssl_learner_images_total", {}), ("streamssl_learner_steps_total", {}),
        ("streamssl_learner_skipped_steps_total", {}), ("streamssl_learner_loss", {}),
        ("streamssl_learner_learning_rate", {}), ("streamssl_learner_code_entropy_nats", {}),
        ("streamssl_learner_prototypes_in_use", {}), ("streamssl_learner_queue_fill_ratio", {}),
        ("streamssl_learner_step_seconds_count", {}), ("streamssl_learner_data_wait_seconds_count", {}),
        ("streamssl_learner_part_seconds_count", {"part": "sinkhorn"}),
        ("streamssl_learner_last_step_timestamp_seconds", {})]),
    ("set_data_wait_share", lambda m: m.set_data_wait_share(0.4), [("streamssl_learner_data_wait_ratio", {})]),
    ("bad_sample", lambda m: m.bad_sample("truncated"), [("streamssl_samples_bad_total", {"reason": "truncated"})]),
    ("shard_done", lambda m: m.shard_done(), [("streamssl_source_shards_total", {})]),
    ("store_result ok", lambda m: m.store_result(True, lag_steps=7), [
        ("streamssl_store_writes_total", {}), ("streamssl_store_up", {}), ("streamssl_store_lag_steps", {}),
        ("streamssl_store_last_success_timestamp_seconds", {})]),
    ("store_result failed", lambda m: m.store_result(False, lag_steps=0), [
        ("streamssl_store_write_failures_total", {})]),
    ("prototype_drift", lambda m: m.prototype_drift(0.01), [("streamssl_learner_prototype_drift", {})]),
    ("checkpoint_written", lambda m: m.checkpoint_written(1.7e9), [
        ("streamssl_checkpoint_last_write_timestamp_seconds", {})]),
    ("probe_accuracy", lambda m: m.probe_accuracy(0.5, seconds=2.5), [("streamssl_probe_accuracy_ratio", {}),
                                                                       ("streamssl_probe_duration_seconds", {})]),
    ("checkpoint_failed", lambda m: m.checkpoint_failed(), [("streamssl_checkpoint_write_failures_total", {})]),
    ("set_source_idle", lambda m: m.set_source_idle(12.5), [("streamssl_source_idle_seconds", {})]),
    ("collapse", lambda m: m.collapse(True), [("streamssl_learner_collapsed", {})]),
    ("collapse_recovered", lambda m: m.collapse_recovered(), [("streamssl_learner_collapse_recoveries_total", {})]),
    ("replay", lambda m: (m.replay(REPLAY_SNAPSHOT), m.replay({**REPLAY_SNAPSHOT, **REPLAY_GREW})), [
        (f"streamssl_replay_{name}", {}) for name in (
            "samples", "bytes", "fill_ratio", "redundancy", "draws_per_arrival", "arrivals_total",
            "evictions_total", "refused_total", "draws_total")]),
]
SET_AT_START = {"streamssl_build", "streamssl_daemon_start_timestamp_seconds"}


@pytest.mark.parametrize(("call", "moved"), [(c, moved) for _, c, moved in CALLS], ids=[n for n, _, _ in CALLS])
def test_every_method_moves_its_metrics(registry: CollectorRegistry, metrics: Metrics,
                                        call: Callable[[Metrics], Any], moved: list[tuple[str, dict[str, str]]]
                                        ) -> None:
    before = {name: value(registry, name, labels) for name, labels in moved}
    call(metrics)
    for name, labels in moved:
        assert value(registry, name, labels) != before[name], name


def test_collapse_flag_clears(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.collapse(True)
    assert value(registry, "streamssl_learner_collapsed") == 1
    metrics.collapse(False)
    assert value(registry, "streamssl_learner_collapsed") == 0


def test_the_calls_cover_every_metric(registry: CollectorRegistry, metrics: Metrics) -> None:
    families = {fam.name for fam in registry.collect()}
    covered = {name for _, _, moved in CALLS for name, _ in moved}
    uncovered = {f for f in families - SET_AT_START
                 if not covered & {f, f"{f}_total", f"{f}_count"}}
    assert not uncovered


# -- names -------------------------------------------------------------------------------------------------


def test_names_follow_the_convention(registry: CollectorRegistry, metrics: Metrics) -> None:
    families = list(registry.collect())
    assert len(families) >= 25
    for fam in families:
        assert fam.name.startswith("streamssl_"), fam.name
        assert fam.documentation.strip(), f"{fam.name} has no help text"
        names = {s.name for s in fam.samples}
        if fam.type == "counter":
            assert f"{fam.name}_total" in names and names <= {f"{fam.name}_total", f"{fam.name}_created"}, names
        else:
            assert not any(n.endswith("_total") for n in names), f"only counters end in _total: {fam.name}"
        if fam.type in ("histogram", "summary"):
            assert fam.name.endswith("_seconds"), f"time metrics are in seconds: {fam.name}"
        if "timestamp" in fam.name or "time" in fam.name.split("_"):
            assert fam.name.endswith("_seconds"), fam.name
        labels = {k for s in fam.samples for k in s.labels} - {"le"}
        bounded = {"reason", "version", "arch", "method", "part", "rank", "world_size"}  # rank: < the job's ranks
        assert labels <= bounded, f"unbounded labels on {fam.name}: {labels}"
        # a step's parts are declared when the metrics are made: never a value from elsewhere
        assert {s.labels["part"] for s in fam.samples if "part" in s.labels} <= set(PARTS), fam.name


def test_module_docstring_lists_every_metric(registry: CollectorRegistry, metrics: Metrics) -> None:
    doc = metrics_module.__doc__ or ""
    for fam in registry.collect():
        exposed = f"{fam.name}_total" if fam.type == "counter" else (
            f"{fam.name}_info" if fam.type == "info" else fam.name)
        assert exposed in doc, f"{exposed} is not documented in the module docstring"


def test_metrics_is_a_leaf_module() -> None:
    tree = ast.parse(Path(metrics_module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    forbidden = {"streamssl.learner.engine", "streamssl.learner.methods", "streamssl.service.daemon", "streamssl.store",
                 "streamssl.service.checkpoint", "streamssl.cli",
                 "torch"}
    assert not {m for m in imported if m in forbidden or m.split(".")[0] == "torch"}


def test_registries_are_independent() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    Metrics(a).shard_done(3)
    Metrics(b)
    assert value(a, "streamssl_source_shards_total") == 3
    assert value(b, "streamssl_source_shards_total") == 0


# -- health rule -------------------------------------------------------------------------------------------


def test_health_rule_warming_up_then_stalled_then_ok() -> None:
    clock = FakeClock()
    m = Metrics(CollectorRegistry(), clock=clock)
    assert m.health(10.0) == (True, {"status": "warming_up", "steps": 0, "last_step_age_s": None, "stall_s": 10.0})
    clock.t += 9.9
    assert m.health(10.0)[0]
    clock.t += 0.1  # no step within stall_s of the start
    assert m.health(10.0) == (False, {"status": "stalled", "steps": 0, "last_step_age_s": None, "stall_s": 10.0})
    m.observe_step(**STEP)
    assert m.health(10.0) == (True, {"status": "ok", "steps": 1, "last_step_age_s": 0.0, "stall_s": 10.0})
    clock.t += 9.5
    assert m.health(10.0)[0]
    clock.t += 0.5
    healthy, body = m.health(10.0)
    assert not healthy and body["status"] == "stalled" and body["last_step_age_s"] == pytest.approx(10.0)


# -- HTTP --------------------------------------------------------------------------------------------------


@pytest.fixture
def server(registry: CollectorRegistry, metrics: Metrics) -> Iterator[MetricsServer]:
    srv = MetricsServer(metrics, registry, host="127.0.0.1", port=0, stall_s=1.0)
    try:
        yield srv
    finally:
        srv.close()


def test_metrics_endpoint_serves_the_exposition(server: MetricsServer, metrics: Metrics) -> None:
    assert server.port > 0 and server.address == ("127.0.0.1", server.port)
    metrics.observe_step(**STEP)
    metrics.bad_sample("corrupt")
    status, content_type, body = get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    text = body.decode()
    assert "# HELP streamssl_learner_steps_total" in text
    assert "# TYPE streamssl_learner_step_seconds histogram" in text
    assert "streamssl_learner_steps_total 1.0" in text
    assert 'streamssl_samples_bad_total{reason="corrupt"} 1.0' in text
    status, content_type, body = get(f"http://127.0.0.1:{server.port}/metrics",
                                     accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_healthz_turns_503_after_stall_s_without_a_step_and_back(server: MetricsServer, metrics: Metrics) -> None:
    url = f"http://127.0.0.1:{server.port}/healthz"
    stepped = time.monotonic()  # read before the step: the step's own time is later
    metrics.observe_step(**STEP)
    status, content_type, body = get(url)
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body)["status"] == "ok"
    deadline = stepped + 10
    while (status := get(url)[0]) == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 503
    assert time.monotonic() - stepped >= 1.0  # not before stall_s
    status, _, body = get(url)
    assert json.loads(body)["status"] == "stalled" and json.loads(body)["last_step_age_s"] >= 1.0
    metrics.observe_step(**STEP)
    status, _, body = get(url)
    assert status == 200 and json.loads(body)["steps"] == 2


def test_healthz_while_warming_up_and_stalled_at_start() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    m = Metrics(registry, clock=clock)
    with MetricsServer(m, registry, host="127.0.0.1", port=0, stall_s=60.0) as srv:
        url = f"http://127.0.0.1:{srv.port}/healthz"
        status, _, body = get(url)
        assert status == 200 and json.loads(body)["status"] == "warming_up"
        clock.t += 60.0
        status, _, body = get(url)
        assert status == 503 and json.loads(body) == {"status": "stalled", "steps": 0, "last_step_age_s": None,
                                                      "stall_s": 60.0}


def test_other_paths_are_404(server: MetricsServer) -> None:
    for path in ("/", "/metricsx", "/healthz/extra", "/favicon.ico"):
        assert get(f"http://127.0.0.1:{server.port}{path}")[0] == 404


def test_close_releases_the_port(registry: CollectorRegistry, metrics: Metrics) -> None:
    srv = MetricsServer(metrics, registry, host="127.0.0.1", port=0, stall_s=1.0)
    port = srv.port
    assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    srv.close()
    srv.close()  # idempotent
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_binds_the_configured_ipv6_loopback(registry: CollectorRegistry, metrics: Metrics) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with MetricsServer(metrics, registry, host="::1", port=0, stall_s=1.0) as srv:
        assert srv.address[0] == "::1"
        assert get(f"http://[::1]:{srv.port}/metrics")[0] == 200


def test_replay_counters_count_from_the_first_snapshot_on(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.replay({**REPLAY_SNAPSHOT, "redundancy": float("nan")})  # restored from a checkpoint: a baseline
    assert value(registry, "streamssl_replay_evictions_total") == 0
    assert value(registry, "streamssl_replay_samples") == 10 and value(registry, "streamssl_replay_redundancy") == 0
    metrics.replay({**REPLAY_SNAPSHOT, **REPLAY_GREW})
    assert value(registry, "streamssl_replay_arrivals_total") == 20
    assert value(registry, "streamssl_replay_evictions_total") == 15
    assert value(registry, "streamssl_replay_draws_total") == 40
    assert value(registry, "streamssl_replay_redundancy") == 0.6
