"""The daemon end to end: real shards, DALI (CPU) or the torchvision twin, real redis-server, real signals.

Subprocess tests run ``python -m streamssl.cli run`` exactly as an operator would and watch it from outside:
its stdout, its /metrics endpoint, its checkpoints, Redis.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client import CollectorRegistry

from streamssl.config import resolve
from streamssl.service.checkpoint import CheckpointManager
from streamssl.service.daemon import Daemon
from streamssl.stream.pack import pack_shards
from streamssl.stream.redis_source import publish_urls

TINY = [
    "model.arch=resnet18", "model.hidden_dim=32", "model.out_dim=16", "model.n_prototypes=16",
    "learner.batch_size=8", "learner.optimizer=sgd", "learner.base_lr=0.05", "learner.warmup_steps=0",
    "augment.sizes=[32,16]", "augment.n_views=[2,2]", "augment.min_scale=[0.3,0.1]", "augment.max_scale=[1,0.3]",
    "augment.n_threads=1", "augment.blur_p=0", "source.shuffle_buffer=0", "source.poll_s=0.2",
    "run.log_every_steps=1", "run.device=cpu", "run.threads=1",
]


def make_shards(folder: Path, n_shards: int, per_shard: int = 8) -> list[str]:
    rng = np.random.default_rng(0)
    src = folder / "src"
    src.mkdir(parents=True)
    for i in range(n_shards * per_shard):
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(src / f"img{i:04d}.jpg", quality=90)
    return [str(p) for p in pack_shards(src, str(folder / "shards" / "s-%06d.tar"), per_shard=per_shard)]


def config(tmp_path: Path, *extra: str):
    return resolve(None, environ={}, overrides=[*TINY, f"checkpoint.dir={tmp_path / 'run'}", *extra])


def sample_value(metrics_url: str, name: str, labels: str = "") -> float | None:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class DaemonProcess:
    """``streamssl run`` in a subprocess; stdout collected by a thread."""

    def __init__(self, tmp_path: Path, *overrides: str) -> None:
        args = [sys.executable, "-m", "streamssl.cli", "run", "--config", "cpu-small"]
        for item in [*TINY, f"checkpoint.dir={tmp_path / 'run'}", "metrics.port=0", *overrides]:
            args += ["--set", item]
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSSL_")}
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=Path(__file__).resolve().parent.parent)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def metrics_url(self) -> str:
        found = wait_for(lambda: re.search(r"metrics on (http://\S+/metrics)", self.output), 120, "metrics URL")
        return found.group(1)  # type: ignore[union-attr]

    def steps(self) -> int:
        return max([int(m) for m in re.findall(r"^step +(\d+) \|", self.output, re.M)] or [0])

    def wait(self, timeout_s: float = 120) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def test_in_process_run_with_local_store(tmp_path: Path) -> None:
    shards = make_shards(tmp_path, 2)
    cfg = config(tmp_path, f"source.urls=[\"{shards[0]}\", \"{shards[1]}\"]", "run.max_steps=5",
                 "checkpoint.every_steps=2", "store.every_steps=2", "metrics.port=-1")
    registry = CollectorRegistry()
    lines: list[str] = []
    summary = Daemon(cfg, registry=registry, echo=lines.append).run()
    assert summary.steps == 5 and summary.images == 40 and not summary.stopped_by_signal
    assert [int(p.name[5:17]) for p in CheckpointManager(tmp_path / "run").paths()] == [2, 4, 5]
    assert registry.get_sample_value("streamssl_learner_steps_total") == 5
    assert registry.get_sample_value("streamssl_learner_images_total") == 40
    assert registry.get_sample_value("streamssl_store_up") == 1
    assert registry.get_sample_value("streamssl_checkpoint_last_write_timestamp_seconds") > 0
    assert sum("step " in line and "img/s" in line for line in lines) == 5
    from streamssl.store import LocalPrototypeStore

    protos, meta = LocalPrototypeStore(tmp_path / "run" / "store").read()
    assert protos.shape == (16, 16) and meta.step == 5


@pytest.mark.parametrize("budget", ["run.max_steps=6", "run.max_images=48"])
def test_budget_schedule_decays_to_final_lr_when_the_run_stops(tmp_path: Path, budget: str) -> None:
    shards = make_shards(tmp_path, 2)
    cfg = config(tmp_path, f"source.urls=[\"{shards[0]}\"]", "source.cycle=true", budget, "metrics.port=-1",
                 "learner.schedule=budget", "learner.final_lr=0.001")
    summary = Daemon(cfg, echo=lambda _: None).run()
    assert summary.steps == 6
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in history if "lr" in r]
    # the lr of step n (1-based) is set before it, at n - 1 of 6 steps (8 images each) of the budget used
    expected = [0.001 + 0.5 * (0.05 - 0.001) * (1 + math.cos(math.pi * (n - 1) / 6)) for n in range(1, 7)]
    assert lrs == pytest.approx(expected, abs=1e-6)


def test_budget_schedule_needs_a_budget(tmp_path: Path) -> None:
    from streamssl.config import ConfigError

    with pytest.raises(ConfigError, match="needs a run budget"):
        config(tmp_path, "learner.schedule=budget")
    timed = Daemon(config(tmp_path, "learner.schedule=budget", "run.max_seconds=60", "run.max_steps=100",
                          "metrics.port=-1"), echo=lambda _: None)
    assert timed.budget_used(15.0) == pytest.approx(0.25)  # time runs out first: 0 of 100 steps done
    timed.learner.step_count = 50
    assert timed.budget_used(15.0) == pytest.approx(0.5)  # now the steps lead
    assert timed.budget_used(600.0) == 1.0
    unbounded = Daemon(config(tmp_path, "metrics.port=-1"), echo=lambda _: None)
    assert unbounded.budget_used(1e6) is None


def test_pattern_source_resume_skips_no_shard(tmp_path: Path) -> None:
    shards = make_shards(tmp_path, 4)
    urls = "source.urls=[" + ", ".join(f'"{s}"' for s in shards) + "]"
    first = Daemon(config(tmp_path, urls, "source.cycle=false", "run.max_steps=2", "metrics.port=-1"),
                   echo=lambda _: None)
    first.run()
    second = Daemon(config(tmp_path, urls, "source.cycle=false", "metrics.port=-1"), echo=lambda _: None)
    summary = second.run()  # runs until the finite stream ends
    assert summary.steps == 4 and summary.images == 16  # 2 shards before, the 2 left after the restart
    state = CheckpointManager(tmp_path / "run").load()
    assert state["position"]["n_samples"] == 32 and state["images"] == 32


def test_sigterm_checkpoints_and_restart_resumes(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    shards = make_shards(tmp_path, 2)
    urls = f'source.urls=["{shards[0]}", "{shards[1]}"]'
    first = DaemonProcess(tmp_path, urls, "checkpoint.every_steps=1000")
    daemons.append(first)
    wait_for(lambda: first.steps() >= 3, 180, "three steps")
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait() == 0, first.output
    stopped_at = CheckpointManager(tmp_path / "run").load()["step"]
    assert stopped_at >= 3 and "stopped after" in first.output

    second = DaemonProcess(tmp_path, urls, f"run.max_steps={stopped_at + 2}")
    daemons.append(second)
    assert second.wait(180) == 0, second.output
    assert f"at step {stopped_at}" in second.output and f"stopped after {stopped_at + 2} steps" in second.output


def test_metrics_move_and_redis_outage_never_stops_training(tmp_path: Path, redis_server,
                                                            daemons: list[DaemonProcess]) -> None:
    shards = make_shards(tmp_path, 2)
    d = DaemonProcess(tmp_path, f'source.urls=["{shards[0]}", "{shards[1]}"]', f"store.url={redis_server.url}",
                      "store.every_steps=1", "store.retry_max_s=0.5", "store.socket_timeout_s=0.5",
                      "store.heartbeat_ttl_s=3")
    daemons.append(d)
    url = d.metrics_url()
    client = redis.Redis.from_url(redis_server.url)
    wait_for(lambda: client.hget("streamssl:prototypes", "version"), 120, "prototypes in Redis")
    steps_before = sample_value(url, "streamssl_learner_steps_total")
    assert steps_before and sample_value(url, "streamssl_learner_images_total") == 8 * steps_before

    redis_server.stop()
    wait_for(lambda: sample_value(url, "streamssl_store_up") == 0, 60, "store down in metrics")
    down_at = sample_value(url, "streamssl_learner_steps_total")
    wait_for(lambda: sample_value(url, "streamssl_learner_steps_total") >= down_at + 3, 120,
             "training to go on while Redis is down")
    assert sample_value(url, "streamssl_store_write_failures_total") >= 1

    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    wait_for(lambda: sample_value(url, "streamssl_store_up") == 1, 60, "store up again")
    step = int(wait_for(lambda: client.hget("streamssl:prototypes", "step"), 60, "prototypes written again"))
    assert step > down_at  # the store caught up with training, not with the last step before the outage

    def live_learners() -> list:
        status = subprocess.run([sys.executable, "-m", "streamssl.cli", "status", "--store", redis_server.url,
                                 "--json"], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(status.stdout)["learners"]

    learners = wait_for(live_learners, 60, "the learner's heartbeat in `streamssl status`")
    assert len(learners) == 1 and learners[0]["info"]["step"] >= 1
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0


def test_kill_9_with_redis_source_loses_no_shard(tmp_path: Path, redis_server,
                                                 daemons: list[DaemonProcess]) -> None:
    shards = make_shards(tmp_path, 8)  # 8 shards x 8 images = one batch each
    publish_urls(redis_server.url, shards)
    common = [f"source.urls=[\"{redis_server.url}\"]", "source.consumer=learner-a", "checkpoint.every_steps=3",
              "run.max_images=64"]
    first = DaemonProcess(tmp_path, *common)
    daemons.append(first)
    wait_for(lambda: CheckpointManager(tmp_path / "run").paths(), 180, "a first checkpoint")
    first.proc.send_signal(signal.SIGKILL)
    first.wait()

    second = DaemonProcess(tmp_path, *common)
    daemons.append(second)
    assert second.wait(180) == 0, second.output
    client = redis.Redis.from_url(redis_server.url)
    group = client.xinfo_groups("streamssl:shards")[0]
    assert group["pending"] == 0  # every delivered shard was acked ...
    assert group["entries-read"] == 8 and group["lag"] == 0  # ... and every published shard delivered
    state = CheckpointManager(tmp_path / "run").load()
    assert state["images"] >= 64 and state["position"]["open"] == []


def test_a_quiet_stream_gets_one_checkpoint_and_its_shards_acknowledged(tmp_path: Path, redis_server,
                                                                       daemons: list[DaemonProcess]) -> None:
    shards = make_shards(tmp_path, 3)
    publish_urls(redis_server.url, shards)
    d = DaemonProcess(tmp_path, f'source.urls=["{redis_server.url}"]', "checkpoint.every_steps=1000",
                      "checkpoint.idle_s=2")
    daemons.append(d)
    client = redis.Redis.from_url(redis_server.url)
    # acks follow checkpoints: without the idle one, the shards would stay pending until the next 1000 steps
    wait_for(lambda: d.steps() == 3 and client.xinfo_groups("streamssl:shards")[0]["pending"] == 0, 120,
             "three steps, then every shard acknowledged while the daemon runs")
    assert [int(p.name[5:17]) for p in CheckpointManager(tmp_path / "run").paths()] == [3]
    time.sleep(3)  # quiet for longer: nothing new to write, so no second checkpoint
    assert len(CheckpointManager(tmp_path / "run").paths()) == 1 and d.proc.poll() is None
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0, d.output


def test_clear_errors_for_a_foreign_checkpoint_and_a_taken_port(tmp_path: Path) -> None:
    import socket

    from typer.testing import CliRunner

    from streamssl.cli import app

    runner = CliRunner()
    base = [x for item in TINY for x in ("--set", item)] + ["--set", f"checkpoint.dir={tmp_path}",
                                                           "--set", "run.max_steps=1", "--set", "metrics.port=-1"]
    assert runner.invoke(app, ["run", *base]).exit_code == 0
    result = runner.invoke(app, ["run", *base, "--set", "model.n_prototypes=32", "--set", "run.max_steps=2"])
    # configuration errors: exit 2, one line
    assert result.exit_code == 2 and "does not fit the configured run" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["run", *base, "--set", f"metrics.port={port}", "--set", "run.max_steps=2"])
    assert result.exit_code == 2 and "metrics.port=0" in result.stderr and "holds the port" in result.stderr
