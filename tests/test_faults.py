"""Fault injection: the real daemon as a subprocess (``streamssl run``), a real redis-server, real shards.

Each test injects one fault and checks what the daemon does and what is lost; the README's fault table is
made from these tests. The goal everywhere: nothing lost beyond one checkpoint interval of learning, and no
shard. Marked ``faults`` (``pytest -m faults`` runs only these) and ``slow``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import redis

from streamssl.learner.methods.npid import id_key
from streamssl.service.checkpoint import CheckpointManager, load_checkpoint
from streamssl.stream.redis_source import DEFAULT_STREAM_KEY, publish_urls
from tests.test_daemon import DaemonProcess, make_shards, sample_value, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]

REDIS_FAST = ["store.retry_max_s=0.5", "store.socket_timeout_s=0.5", "store.every_steps=1"]


def start(daemons: list[DaemonProcess], tmp_path: Path, *overrides: str) -> DaemonProcess:
    d = DaemonProcess(tmp_path, *overrides)
    daemons.append(d)
    return d


def through_an_outage(daemons: list[DaemonProcess], tmp_path: Path, server, every_steps: int) -> DaemonProcess:
    """A daemon with its ingest stream and store on ``server``; after two steps ``server`` is killed, and is
    down (as the daemon's metrics tell) when this returns."""
    d = start(daemons, tmp_path, f'source.urls=["{server.url}"]', f"store.url={server.url}",
              f"checkpoint.every_steps={every_steps}", *REDIS_FAST)
    url = d.metrics_url()
    wait_for(lambda: d.steps() >= 2, 180, "two steps")
    server.stop()
    wait_for(lambda: sample_value(url, "streamssl_store_up") == 0, 60, "the store down in the metrics")
    return d


def group_info(url: str) -> dict:
    groups = redis.Redis.from_url(url).xinfo_groups(DEFAULT_STREAM_KEY)
    return groups[0] if groups else {}


def all_acked(url: str, n_entries: int) -> bool:
    """Every one of ``n_entries`` announced shards delivered and acknowledged (acks follow checkpoints)."""
    with contextlib.suppress(redis.RedisError):
        info = group_info(url)
        return info.get("entries-read") == n_entries and info.get("lag") == 0 and info.get("pending") == 0
    return False


def sample_ids(shards: list[str]) -> set[str]:
    """``Sample.id`` of every image of ``shards``: shard URL and member key."""
    ids = set()
    for url in shards:
        with tarfile.open(url) as tar:
            ids |= {f"{url}#{m.name.rsplit('.', 1)[0]}" for m in tar.getmembers() if m.isfile()}
    return ids


def npid_bank_keys(state: dict) -> set[int]:
    (keys,) = [v for k, v in state["learner"]["model"].items() if k.endswith("bank_keys")]
    return {int(k) for k in keys.tolist() if k >= 0}


def resumed_step(d: DaemonProcess) -> int:
    found = re.search(r"resumed from \S+ at step (\d+)", d.output)
    return int(found.group(1)) if found else 0


def checkpoint_tmp_files(folder: Path) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return [e.name for e in os.scandir(folder) if e.name.startswith(".ckpt-") and e.name.endswith(".tmp")]
    return []


# ---------------------------------------------------------------------------------------------- Redis


def test_redis_down_at_start_then_up(tmp_path: Path, redis_server, daemons) -> None:
    """Store and source on a Redis that is not there yet: the daemon starts, waits, and trains once it is."""
    shards = make_shards(tmp_path, 4)
    redis_server.stop()
    d = start(daemons, tmp_path, f'source.urls=["{redis_server.url}"]', f"store.url={redis_server.url}",
              "checkpoint.every_steps=2", *REDIS_FAST)
    wait_for(lambda: "retrying with backoff" in d.output, 120, "the source to report Redis away")
    time.sleep(3)
    assert d.proc.poll() is None and d.steps() == 0, d.output
    redis_server.start()
    publish_urls(redis_server.url, shards)
    wait_for(lambda: all_acked(redis_server.url, 4), 180, "every shard trained and acknowledged")
    client = redis.Redis.from_url(redis_server.url)
    assert int(wait_for(lambda: client.hget("streamssl:prototypes", "step"), 60, "prototypes in the store")) >= 1
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0, d.output
    assert CheckpointManager(tmp_path / "run").load()["images"] == 32


def test_redis_killed_and_restarted_loses_no_shard(tmp_path: Path, persistent_redis, daemons) -> None:
    """Redis dies mid-run and comes back with its data: training pauses for shards, then every shard is
    trained exactly once and acknowledged; the store catches up."""
    shards = make_shards(tmp_path, 12)
    publish_urls(persistent_redis.url, shards)
    d = through_an_outage(daemons, tmp_path, persistent_redis, every_steps=1)
    down_at = d.steps()
    time.sleep(3)
    persistent_redis.start()
    wait_for(lambda: all_acked(persistent_redis.url, 12), 180, "every shard trained and acknowledged")
    client = redis.Redis.from_url(persistent_redis.url)
    wait_for(lambda: int(client.hget("streamssl:prototypes", "step") or 0) > down_at, 60, "the store caught up")
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0, d.output
    state = CheckpointManager(tmp_path / "run").load()
    assert state["images"] == 96 and state["position"]["open"] == []  # 12 shards of 8, none twice


def test_redis_restarted_empty_rebuilds_the_group_and_the_store(tmp_path: Path, redis_server, daemons) -> None:
    """Redis comes back with nothing: the consumer group is made again, the prototypes are written again
    at the next publish, and shards announced after the restart are trained. What Redis lost with its
    data (announcements no learner had read yet) must be announced again by the producer."""
    shards = make_shards(tmp_path, 8)
    publish_urls(redis_server.url, shards[:6])
    d = through_an_outage(daemons, tmp_path, redis_server, every_steps=1)
    redis_server.start()  # empty: no stream, no group, no prototypes
    restart_step = d.steps()
    new_ids = publish_urls(redis_server.url, shards[6:])
    wait_for(lambda: group_info(redis_server.url).get("last-delivered-id") == new_ids[-1].encode(), 180,
             "the re-announced shards delivered")
    client = redis.Redis.from_url(redis_server.url)
    wait_for(lambda: int(client.hget("streamssl:prototypes", "step") or 0) > restart_step, 60,
             "the prototypes written again")
    wait_for(lambda: all_acked(redis_server.url, 2), 120, "the re-announced shards trained and acknowledged")
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0, d.output


def test_stream_trimmed_under_the_consumer_group(tmp_path: Path, redis_server, daemons) -> None:
    """XTRIM removes every entry, delivered or not, while the learner reads: open shards are finished,
    their acks do no harm, later announcements are trained; trimmed entries never delivered are gone (that
    is what trimming means: trim below the group's oldest pending entry, see the README)."""
    shards = make_shards(tmp_path, 12)
    publish_urls(redis_server.url, shards[:8])
    d = start(daemons, tmp_path, f'source.urls=["{redis_server.url}"]', "checkpoint.every_steps=1",
              *REDIS_FAST)
    wait_for(lambda: d.steps() >= 2, 180, "two steps")
    client = redis.Redis.from_url(redis_server.url)
    client.xtrim(DEFAULT_STREAM_KEY, maxlen=0, approximate=False)
    new_ids = publish_urls(redis_server.url, shards[8:])
    wait_for(lambda: group_info(redis_server.url).get("last-delivered-id") == new_ids[-1].encode(), 180,
             "the new shards delivered")
    delivered = group_info(redis_server.url)["entries-read"]  # before the trim and after it
    wait_for(lambda: d.steps() >= delivered, 120, "every delivered shard trained")
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0, d.output
    assert group_info(redis_server.url)["pending"] == 0
    # each shard one batch: every delivered shard trained once, the trimmed undelivered ones not at all
    assert CheckpointManager(tmp_path / "run").load()["images"] == 8 * delivered < 8 * 12


# ------------------------------------------------------------------------------------- kills, signals


@pytest.mark.timeout(900)
def test_sigkill_at_ten_seeded_moments_trains_every_image(tmp_path: Path, redis_server, daemons) -> None:
    """Ten SIGKILLs at seeded random moments (some before the first step, some mid-step, some while a
    checkpoint is written): each restart resumes from the last checkpoint, losing at most one checkpoint
    interval, and the final checkpoint's NPID memory (keyed by sample id) holds every image of every shard:
    each was trained on at least once in the lineage of the final checkpoint."""
    shards = make_shards(tmp_path, 40)
    publish_urls(redis_server.url, shards)
    every = 3
    common = [f'source.urls=["{redis_server.url}"]', "source.consumer=learner-a", f"checkpoint.every_steps={every}",
              "learner.method=npid", "npid.memory_length=512", "npid.negatives=16", "checkpoint.idle_s=2"]
    rng = random.Random(21)
    for kill in range(10):
        seen = kill_after(start(daemons, tmp_path, *common), rng.randint(0, 5), rng.uniform(0.0, 0.6),
                          lambda: all_acked(redis_server.url, 40))
        resumed = CheckpointManager(tmp_path / "run").load()
        assert resumed is None or resumed["step"] >= seen - every, (kill, seen, resumed["step"])

    final = start(daemons, tmp_path, *common)
    wait_for(lambda: all_acked(redis_server.url, 40), 300, "every shard trained and acknowledged")
    final.proc.send_signal(signal.SIGTERM)
    assert final.wait() == 0, final.output
    state = CheckpointManager(tmp_path / "run").load()
    expected = {id_key(i) for i in sample_ids(shards)}
    missing = expected - npid_bank_keys(state)
    assert not missing, f"{len(missing)} of {len(expected)} images never trained"
    assert state["images"] == len(expected)  # and none twice: a resume continues at the exact sample


def kill_after(d: DaemonProcess, new_steps: int, delay_s: float, done) -> int:
    """SIGKILL ``d`` ``delay_s`` after its ``new_steps``-th step since start-up (0: right after start-up, or
    once ``done()``); returns the last step it printed."""
    wait_for(lambda: "metrics on" in d.output, 120, "start-up")
    first = resumed_step(d)
    if new_steps:
        wait_for(lambda: d.steps() >= first + new_steps or done(), 240, f"{new_steps} steps")
    time.sleep(delay_s)
    seen = d.steps()
    d.proc.send_signal(signal.SIGKILL)
    d.wait()
    return seen


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_signal_during_a_checkpoint_write(tmp_path: Path, daemons, sig: signal.Signals) -> None:
    """The signal lands while a checkpoint file is being written. SIGTERM: the write completes, a final
    checkpoint follows, the exit is clean. SIGKILL: the half-written file is a hidden temporary that no
    load considers and the next start removes; the previous checkpoint is used."""
    shards = make_shards(tmp_path, 2)
    folder = tmp_path / "run"
    d = start(daemons, tmp_path, f'source.urls=["{shards[0]}", "{shards[1]}"]', "source.cycle=true",
              "checkpoint.every_steps=2", "checkpoint.keep=5")
    deadline = time.monotonic() + 180
    while not checkpoint_tmp_files(folder):  # poll fast: a write takes a few hundred milliseconds
        assert time.monotonic() < deadline and d.proc.poll() is None, d.output
        time.sleep(0.002)
    d.proc.send_signal(sig)
    code = d.wait()
    complete = CheckpointManager(folder).paths()
    if sig == signal.SIGTERM:
        assert code == 0, d.output
        assert not checkpoint_tmp_files(folder)
        stopped = int(re.search(r"stopped after (\d+) steps", d.output).group(1))
        assert load_checkpoint(complete[-1])["step"] == stopped
    else:
        assert code == -signal.SIGKILL
        stopped = load_checkpoint(complete[-1])["step"] if complete else 0  # the write in flight is lost
    again = start(daemons, tmp_path, f'source.urls=["{shards[0]}", "{shards[1]}"]', "source.cycle=true",
                  f"run.max_steps={stopped + 2}")
    assert again.wait(180) == 0, again.output
    assert resumed_step(again) == stopped and not checkpoint_tmp_files(folder)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path, daemons) -> None:
    shards = make_shards(tmp_path, 2)
    urls = f'source.urls=["{shards[0]}", "{shards[1]}"]'
    first = start(daemons, tmp_path, urls, "source.cycle=true", "checkpoint.every_steps=2", "run.max_steps=4")
    assert first.wait(180) == 0, first.output
    newest = CheckpointManager(tmp_path / "run").paths()[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # damage inside a tensor: only the CRC can tell
    newest.write_bytes(bytes(data))
    second = start(daemons, tmp_path, urls, "source.cycle=true", "run.max_steps=5")
    assert second.wait(180) == 0, second.output
    assert resumed_step(second) == 2 and newest.name in second.output and "trying the one before it" in second.output


# ------------------------------------------------------------------------------------------ the disk


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 600 MiB tmpfs (room for a few checkpoints of the tiny model); needs root to mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Write zeros until the file system is full; returns the file to delete to free it again."""
    filler = folder / "filler.bin"
    chunk = bytes(1 << 20)
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(chunk)
    return filler


def test_disk_full_at_checkpoint_time(tmp_path: Path, small_disk: Path, daemons) -> None:
    """The checkpoint folder's disk fills up: the previous checkpoint stays intact, a clear error is logged,
    training goes on, and checkpoints resume once there is room again."""
    shards = make_shards(tmp_path, 2)
    run = small_disk / "run"
    d = start(daemons, tmp_path, f'source.urls=["{shards[0]}", "{shards[1]}"]', "source.cycle=true",
              f"checkpoint.dir={run}", "checkpoint.every_steps=3", "checkpoint.keep=2")
    url = d.metrics_url()
    wait_for(lambda: CheckpointManager(run).paths(), 180, "a first checkpoint")
    filler = fill(small_disk)
    full_at = d.steps()
    wait_for(lambda: (sample_value(url, "streamssl_checkpoint_write_failures_total") or 0) >= 1, 180,
             "a checkpoint write to fail")
    assert "No space left on device" in d.output and "training goes on" in d.output
    wait_for(lambda: d.steps() >= full_at + 6, 180, "training to go on on a full disk")
    kept = CheckpointManager(run).paths()
    assert kept and all(load_checkpoint(p)["step"] <= full_at + 3 for p in kept)  # verified: CRC and load
    assert not checkpoint_tmp_files(run)
    filler.unlink()
    back_at = d.steps()
    wait_for(lambda: load_checkpoint(CheckpointManager(run).paths()[-1])["step"] > back_at, 180,
             "checkpoints to resume")
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0, d.output


# ----------------------------------------------------------------------------------- a followed folder


def test_followed_folder_vanishes_and_comes_back(tmp_path: Path, daemons) -> None:
    """The folder is moved away (an unmounted share) and back, with new shards: the daemon waits, says so
    once instead of at every poll, reads the new shards and none of the old ones twice."""
    shards = make_shards(tmp_path, 5)
    folder = tmp_path / "incoming"
    folder.mkdir()
    for s in shards[:3]:
        shutil.copy(s, folder)
    d = start(daemons, tmp_path, f'source.urls=["{folder}"]', "source.settle_s=0", "checkpoint.every_steps=1")
    wait_for(lambda: d.steps() >= 3, 180, "the first three shards")
    away = tmp_path / "away"
    folder.rename(away)
    time.sleep(4)  # 20 polls
    assert d.proc.poll() is None
    assert d.output.count(f"shard folder {folder}") == 1, d.output
    for s in shards[3:]:
        shutil.copy(s, away)
    away.rename(folder)
    wait_for(lambda: d.steps() >= 5, 120, "the two new shards")
    assert "is back" in d.output
    time.sleep(2)  # more polls: nothing more to read
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait() == 0, d.output
    assert CheckpointManager(tmp_path / "run").load()["images"] == 40
