"""Checkpoints that cannot silently go wrong, and a daemon that tells what it does when its world misbehaves
(issue: defects found as a new user and an adversary)."""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from streamssl.config import SourceConfig, resolve
from streamssl.service import checkpoint as checkpoint_module
from streamssl.service.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from streamssl.service.daemon import Daemon, DataPathFailed
from streamssl.service.recovery import NonFiniteRun
from streamssl.stream.samples import SampleStream
from streamssl.stream.source import FolderSource, PatternSource
from tests.synthetic import view_stream
from tests.test_daemon import TINY, make_shards


def config(tmp_path: Path, *extra: str):
    return resolve(None, environ={}, overrides=[*TINY, f"checkpoint.dir={tmp_path / 'run'}", "metrics.port=-1",
                                                *extra])


def views(n: int | None = None):
    stream = view_stream(8, (32, 16), (2, 2), n_clusters=4)
    return stream if n is None else (next(stream) for _ in range(n))


def run(cfg, **kw):
    return Daemon(cfg, registry=kw.pop("registry", CollectorRegistry()), echo=kw.pop("echo", lambda line: None),
                  **kw).run()


# ------------------------------------------------------------------------------------------ checkpoint integrity


def test_damaged_newest_checkpoint_is_refused_with_the_reason_and_the_previous_one_used(tmp_path: Path,
                                                                                          caplog) -> None:
    cfg = config(tmp_path, "run.max_steps=4", "checkpoint.every_steps=2")
    run(cfg, views=views())
    ckpts = CheckpointManager(tmp_path / "run").paths()
    assert [p.name for p in ckpts] == ["ckpt-000000000002.pt", "ckpt-000000000004.pt"]
    newest = ckpts[-1]
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = os.urandom(4096)  # bytes overwritten inside, the archive still well formed
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_checkpoint(newest)
    with caplog.at_level(logging.ERROR, logger="streamssl.service.checkpoint"):
        state = CheckpointManager(tmp_path / "run").load()
    assert state is not None and state["step"] == 2
    assert "does not match its checksum" in caplog.text and "trying the one before it" in caplog.text
    (tmp_path / "junk.pt").write_bytes(os.urandom(1 << 16))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "junk.pt")
    assert "not a complete checkpoint" in str(err.value) and "weights_only" not in str(err.value)


def test_a_run_of_nonfinite_steps_stops_without_a_checkpoint(tmp_path: Path) -> None:
    cfg = config(tmp_path, "run.max_steps=3")
    run(cfg, views=views())
    before = CheckpointManager(tmp_path / "run").paths()

    def poisoned():
        for batch in views():
            yield [torch.full_like(v, math_nan) for v in batch]

    math_nan = float("nan")
    lines: list[str] = []
    summary = run(config(tmp_path, "run.max_steps=100", "run.max_nonfinite_steps=6", "run.log_every_steps=3"),
                  views=poisoned(), echo=lines.append)
    assert isinstance(summary.error, NonFiniteRun) and "6 steps were all non-finite" in str(summary.error)
    assert summary.skipped_steps == 6 and summary.steps == 3
    assert CheckpointManager(tmp_path / "run").paths() == before  # nothing written from the spinning run
    assert [line for line in lines if "non-finite steps in a row" in line][-1].split("|")[1].strip().startswith(
        "skipped 6")


def test_checkpoint_write_failures_are_survived_and_retried(tmp_path: Path, monkeypatch, caplog) -> None:
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint_module.torch, "save", flaky_save)
    registry = CollectorRegistry()
    with caplog.at_level(logging.ERROR, logger="streamssl.service.daemon"):
        summary = run(config(tmp_path, "run.max_steps=6", "checkpoint.every_steps=2"), views=views(),
                      registry=registry)
    assert summary.error is None and summary.steps == 6  # training went on
    assert "No space left on device" in caplog.text and "tries again" in caplog.text
    assert registry.get_sample_value("streamssl_checkpoint_write_failures_total") == 1
    assert [p.name for p in CheckpointManager(tmp_path / "run").paths()] == [
        "ckpt-000000000004.pt", "ckpt-000000000006.pt"]  # step 2 failed, the next interval wrote
    assert not list((tmp_path / "run").glob(".ckpt-*.tmp"))


def test_a_failed_final_checkpoint_is_an_error_not_a_crash(tmp_path: Path, monkeypatch) -> None:
    def no_space(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", no_space)
    summary = run(config(tmp_path, "run.max_steps=3"), views=views())
    assert summary.steps == 3 and summary.error is not None and summary.error.exit_code == 1
    assert "final checkpoint was not written" in str(summary.error)


def test_checkpoint_dir_that_cannot_be_written_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for where in (tmp_path / "file", tmp_path / "file" / "below", Path("/proc/streamssl-run")):
        with pytest.raises(Exception, match=r"checkpoint\.dir") as err:
            Daemon(config(tmp_path, f"checkpoint.dir={where}"), registry=CollectorRegistry())
        assert getattr(err.value, "exit_code", None) == 2


def test_resume_refuses_another_optimizer_and_another_stream(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "data", 2)
    run(config(tmp_path, "run.max_steps=2"), views=views())
    with pytest.raises(CheckpointError, match=r"learner\.optimizer=sgd, this run asks for adamw"):
        run(config(tmp_path, "run.max_steps=3", "learner.optimizer=adamw"), views=views())
    pattern = str(Path(shards[0]).parent / "s-*.tar")
    with pytest.raises(CheckpointError, match=r"checkpoint\.dir") as err:
        run(config(tmp_path, "run.max_steps=3", f"source.urls=['{pattern}']"))
    assert "(the demo)" in str(err.value) and "allow_new_source" in str(err.value)
    summary = run(config(tmp_path, "run.max_steps=3", f"source.urls=['{pattern}']",
                         "checkpoint.allow_new_source=true"))
    assert summary.error is None and summary.steps == 3  # continued the model, from the new stream's start


def test_checkpoints_after_a_rollback_are_the_newest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save({"x": 1}, 10)
    manager.save({"x": 2}, 20)
    rolled_back = manager.save({"x": 3}, 12)  # the learner went back to step 12 (collapse recovery)
    assert rolled_back.name == "ckpt-000000000021.pt" and manager.paths()[-1] == rolled_back
    assert [load_checkpoint(p)["step"] for p in manager.paths()] == [20, 12]
    assert manager.load()["x"] == 3  # a restart resumes the state after the rollback


def test_collapse_rollback_then_checkpoint_then_restart_resumes_after_the_rollback(tmp_path: Path) -> None:
    cfg = config(tmp_path, "run.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep=2")
    daemon = Daemon(cfg, registry=CollectorRegistry(), echo=lambda line: None)
    state_at = {}

    def stream():
        for batch in views():
            if daemon.learner.step_count == 2 and 2 not in state_at:
                state_at[2] = copy.deepcopy(daemon.learner.state_dict())
            yield batch

    daemon._views = stream()
    daemon.run()
    # the collapse handling rolls the learner back to its snapshot (step 2), then checkpoints it
    again = Daemon(config(tmp_path, "run.max_steps=6"), registry=CollectorRegistry(), echo=lambda line: None)
    assert again.restore() and again.learner.step_count == 6
    again.learner.load_state_dict(state_at[2])
    written = again.checkpoint()
    again.close()
    assert written is not None and Path(written).name == "ckpt-000000000007.pt"
    restarted = Daemon(config(tmp_path, "run.max_steps=8"), registry=CollectorRegistry(), echo=lambda line: None)
    assert restarted.restore() and restarted.learner.step_count == 2  # the post-rollback state, not step 6
    restarted.close()


# ------------------------------------------------------------------------------------------ the daemon's world


def test_a_feeder_error_shuts_down_cleanly_then_reports(tmp_path: Path, monkeypatch) -> None:
    import streamssl.service.feeder as feeder_module  # where the daemon's data path is built

    shards = make_shards(tmp_path / "data", 4)
    real = feeder_module.make_multicrop
    calls = {"n": 0}

    def breaking(*a, **kw):
        multicrop = real(*a, **kw)

        def call(batch):
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("decoder exploded")
            return multicrop(batch)

        return call

    monkeypatch.setattr(feeder_module, "make_multicrop", breaking)
    cfg = config(tmp_path, "run.max_steps=50", "metrics.port=0", "augment.backend=torchvision",
                 f"source.urls=['{Path(shards[0]).parent}/s-*.tar']")
    daemon = Daemon(cfg, registry=CollectorRegistry(), echo=lambda line: None)
    summary = daemon.run()
    assert isinstance(summary.error, DataPathFailed) and "decoder exploded" in str(summary.error)
    assert summary.steps >= 1 and summary.checkpoint is not None  # the final checkpoint was written
    assert load_checkpoint(summary.checkpoint)["step"] == summary.steps
    assert not daemon.writer._thread.is_alive()  # the store writer is closed
    with pytest.raises(OSError):  # the metrics server is closed
        import urllib.request
        urllib.request.urlopen(f"http://127.0.0.1:{daemon.server.port}/metrics", timeout=2)


class _Dead(BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_dead_http_shards_back_off_instead_of_spinning(caplog) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dead)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = (f"{base}/a.tar", f"{base}/b.tar")
    cfg = SourceConfig(urls=urls, shuffle_buffer=0)
    stream = SampleStream(PatternSource(urls, cycle=True), cfg)
    with caplog.at_level(logging.WARNING, logger="streamssl.stream.samples"):
        reader = threading.Thread(target=lambda: list(stream), daemon=True)
        reader.start()
        time.sleep(4.0)
        stream.close()
        reader.join(timeout=70)
    server.shutdown()
    # 2 URLs, 1 s then 2 s of backoff each: a handful of requests in 4 s, not hundreds
    assert 2 <= _Dead.hits <= 8, _Dead.hits
    assert "all 2 shard URLs met lately are failing" in caplog.text
    assert caplog.text.count("all 2 shard URLs") == 1  # that line is rate-limited too
    assert not reader.is_alive()


def test_a_quiet_folder_is_reported(tmp_path: Path, monkeypatch, caplog) -> None:
    import streamssl.stream.samples as samples_module

    monkeypatch.setattr(samples_module, "IDLE_LOG_FIRST_S", 0.3)
    stream = SampleStream(FolderSource(tmp_path, poll_s=0.05), SourceConfig(urls=(str(tmp_path),)))
    with caplog.at_level(logging.INFO, logger="streamssl.stream.samples"):
        reader = threading.Thread(target=lambda: list(stream), daemon=True)
        reader.start()
        time.sleep(1.0)
        idle = stream.idle_seconds()
        stream.close()
        reader.join(timeout=10)
    assert idle >= 0.5
    assert f"waiting for new shards (*.tar in {tmp_path})" in caplog.text


def test_the_tls_files_of_the_store_serve_the_ingest_stream() -> None:
    from streamssl.redis_client import TLSFiles
    from streamssl.stream.source import make_source

    source = make_source(SourceConfig(urls=("rediss://127.0.0.1:1/0",)), tls=TLSFiles("/ca.pem", "/c.pem", "/k.pem"))
    kwargs = source._client.connection_pool.connection_kwargs
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == ("/ca.pem", "/c.pem", "/k.pem")


@pytest.mark.slow
def test_second_ctrl_c_exits_130_without_a_checkpoint_and_leaves_the_last_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Every checkpoint write takes 0.5 s longer (a large model on a slow disk), so the second signal, 0.15 s
    # after the first, always lands while the daemon is still stopping, as it does for a real run.
    slow_saves = ("import time, streamssl.service.checkpoint as c; save = c.CheckpointManager.save; "
                  "c.CheckpointManager.save = lambda self, *a, **k: (time.sleep(0.5), save(self, *a, **k))[1]; "
                  "from streamssl.cli import main; main()")
    cmd = [sys.executable, "-c", slow_saves, "run", "--config", "cpu-small", "--set", f"checkpoint.dir={run_dir}",
           "--set", "metrics.port=-1", "--set", "learner.batch_size=8", "--set", "checkpoint.every_steps=2",
           "--set", "run.log_every_steps=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # past the checkpoint of step 2: stopping now has a step left to checkpoint
        if line.startswith("step") and int(line.split()[1]) >= 3:
            break
    assert CheckpointManager(run_dir).paths(), "no first checkpoint"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.15)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "exiting now without a final checkpoint" in err and "inline_container" not in err
    newest = CheckpointManager(run_dir).load()
    assert newest is not None and newest["step"] >= 2  # intact, and loads


def test_history_on_a_full_disk_drops_records_and_says_so(tmp_path: Path, caplog) -> None:
    """/dev/full answers every write with ENOSPC: the record is dropped (training must not stop for it), the
    log says so once, and once writes work again it says how many were lost."""
    from streamssl.service.progress import History

    history = History("/dev/full")
    with caplog.at_level(logging.WARNING, logger="streamssl.service.daemon"):
        for step in range(3):
            history.event({"step": step})
        assert history.dropped == 3 and caplog.text.count("records are dropped") == 1
        history.path = str(tmp_path / "history.jsonl")  # room again
        history.event({"step": 3})
        history.close()
    assert "3 records were dropped" in caplog.text and history.dropped == 0
    assert (tmp_path / "history.jsonl").read_text() == '\n{"step": 3}\n'
