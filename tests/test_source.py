"""source.py: patterns and cycles, the folder follower, the Redis consumer group (against a real
redis-server that the tests kill and restart), the URL scheme policy and make_source."""

from __future__ import annotations

import io
import json
import os
import random
import re
import socket
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from PIL import Image

from streamssl.config import ConfigError, SourceConfig
from streamssl.stream.redis_source import RedisAuthError, RedisStreamSource, publish_urls, redis_client
from streamssl.stream.samples import SampleStream
from streamssl.stream.source import (
    FolderSource,
    PatternSource,
    SourceError,
    check_url,
    expand_pattern,
    make_source,
    open_shard,
)

T = TypeVar("T")

# --------------------------------------------------------------------------------------------- helpers


def touch_all(folder: Path, names: list[str]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return [str(folder / name) for name in names]


def write_shard(path: Path, n: int) -> Path:
    """A real shard of ``n`` small JPEGs."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            out = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 30 % 256, 90, 10)).save(out, "JPEG")
            info = tarfile.TarInfo(f"k{i:03d}.jpg")
            info.size = out.tell()
            tar.addfile(info, io.BytesIO(out.getvalue()))
    return path


def within(timeout_s: float, fn: Callable[[], T], on_timeout: Callable[[], None] | None = None) -> T:
    """Run ``fn`` in a worker thread; fail (instead of hanging) when it takes longer than ``timeout_s``."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout:
        if on_timeout is not None:
            on_timeout()
        pytest.fail(f"no result within {timeout_s} s")
    finally:
        pool.shutdown(wait=False)


class Collector:
    """Iterate a source in a background thread, collecting URLs; stop with close()."""

    def __init__(self, source: FolderSource | RedisStreamSource) -> None:
        self.source = source
        self.urls: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for url in self.source:
                if url is not None:  # None: an idle tick
                    self.urls.append(url)
        except BaseException as exc:  # the test asserts there was none
            self.error = exc

    def wait_for(self, n: int, timeout_s: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while len(self.urls) < n and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.01)
        return list(self.urls)

    def stop(self) -> None:
        self.source.close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def next_url(it: Iterator[str | None], source: RedisStreamSource, timeout_s: float = 10.0) -> str:
    """The next URL from a source iterator, past idle ticks; fails instead of hanging."""

    def first() -> str:
        while (url := next(it)) is None:
            pass
        return url

    return within(timeout_s, first, on_timeout=source.close)


def pending(redis_url: str, stream_key: str = "streamssl:shards", group: str = "learners") -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.xpending(stream_key, group)["pending"])
    finally:
        client.close()


# --------------------------------------------------------------------------------------------- scheme policy


def test_scheme_policy() -> None:
    for ok in ("shards/a.tar", "/data/a.tar", "file:///data/a.tar", "http://host/a.tar", "https://host/a.tar"):
        assert check_url(ok) == ok
    assert check_url("pipe:cat a.tar", allow_pipe=True) == "pipe:cat a.tar"
    for refused in ("pipe:cat a.tar", "s3://bucket/a.tar", "gs://bucket/a.tar", "ftp://host/a.tar", "-", ""):
        with pytest.raises(SourceError) as err:
            check_url(refused)
        assert isinstance(err.value, ValueError)
        assert repr(refused) in str(err.value)


def test_pipe_is_never_run_unless_allowed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(SourceError):
        open_shard(f"pipe:touch {marker}")
    assert not marker.exists()
    with open_shard(f"pipe:touch {marker}; printf x", allow_pipe=True) as stream:
        assert stream.read() == b"x"
    assert marker.exists()


# --------------------------------------------------------------------------------------------- pattern


def test_brace_and_glob_expansion(tmp_path: Path) -> None:
    urls = touch_all(tmp_path, [f"{i:06d}.tar" for i in range(4)])
    assert expand_pattern(str(tmp_path / "{000000..000003}.tar")) == urls
    assert expand_pattern(str(tmp_path / "*.tar")) == urls
    assert expand_pattern(f"file://{tmp_path}/*.tar") == urls
    assert expand_pattern(str(tmp_path / "{000001,000003}.tar")) == [urls[1], urls[3]]
    assert expand_pattern("https://host/s-{0..2}.tar") == [f"https://host/s-{i}.tar" for i in range(3)]


def test_cycle_reshuffles_each_pass_deterministically(tmp_path: Path) -> None:
    urls = touch_all(tmp_path, [f"{i:06d}.tar" for i in range(8)])
    pattern = str(tmp_path / "{000000..000007}.tar")
    source = PatternSource([pattern], cycle=True, seed=5)
    it = iter(source)
    passes = [[next(it) for _ in range(8)] for _ in range(3)]
    for k, order in enumerate(passes):
        assert sorted(order) == urls
        expected = list(urls)
        random.Random(5 + k).shuffle(expected)
        assert order == expected
    assert len({tuple(p) for p in passes}) == 3
    again = iter(PatternSource([pattern], cycle=True, seed=5))
    assert [next(again) for _ in range(8)] == passes[0]


def test_no_cycle_reads_once_in_order(tmp_path: Path) -> None:
    urls = touch_all(tmp_path, ["b.tar", "a.tar"])
    assert list(PatternSource(urls, cycle=False)) == urls
    with pytest.raises(SourceError, match="match no shard"):
        PatternSource([str(tmp_path / "*.nothing")])
    with pytest.raises(SourceError, match="none of the 3 shards exists"):
        PatternSource([str(tmp_path / "missing-{0..2}.tar")])
    assert list(PatternSource([str(tmp_path / "missing.tar"), f"file://{urls[0]}"], cycle=False))[1] == (
        f"file://{urls[0]}")


def test_pattern_state_resumes_mid_pass(tmp_path: Path) -> None:
    urls = touch_all(tmp_path, [f"{i}.tar" for i in range(6)])
    source = PatternSource(urls, cycle=True, seed=2)
    it = iter(source)
    first = [next(it) for _ in range(9)]
    state = json.loads(json.dumps(source.state_dict()))
    rest_expected = [next(it) for _ in range(5)]
    resumed = PatternSource(urls, cycle=True, seed=2)
    resumed.load_state_dict(state)
    rit = iter(resumed)
    assert [next(rit) for _ in range(5)] == rest_expected
    assert len(first) == 9


def test_ranks_split_each_pass(tmp_path: Path) -> None:
    urls = touch_all(tmp_path, [f"{i}.tar" for i in range(7)])
    parts = [PatternSource(urls, cycle=True, seed=1, rank=r, world_size=3).pass_order(4) for r in range(3)]
    assert sorted(u for p in parts for u in p) == urls


# --------------------------------------------------------------------------------------------- folder


def test_folder_picks_up_renamed_shards_and_ignores_partial_names(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    source = FolderSource(folder, poll_s=0.02, settle_s=0.0)
    collector = Collector(source)
    try:
        for name in (".hidden.tar", "a.tar.tmp", "a.tar.part", "notes.txt"):
            (folder / name).write_bytes(b"partial")
        tmp = folder / ".a.tar.tmp"
        tmp.write_bytes(b"complete shard")
        os.replace(tmp, folder / "a.tar")
        assert collector.wait_for(1) == [str(folder / "a.tar")]
        time.sleep(0.1)  # a few more polls: nothing else is taken, nothing twice
        assert collector.urls == [str(folder / "a.tar")]
    finally:
        collector.stop()
    assert collector.error is None


def test_folder_waits_for_a_growing_shard_to_settle(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    growing = folder / "growing.tar"
    growing.write_bytes(b"x" * 100)
    source = FolderSource(folder, poll_s=0.02, settle_s=0.3)
    collector = Collector(source)
    try:
        t_end = time.monotonic() + 0.8
        while time.monotonic() < t_end:  # a slow copy: the file keeps growing
            with open(growing, "ab") as out:
                out.write(b"y" * 100)
            last_write = time.monotonic()
            time.sleep(0.05)
            assert collector.urls == [], "a shard still being written was handed out"
        assert collector.wait_for(1, timeout_s=5) == [str(growing)]
        # handed out only once unchanged for settle_s (measured from the last write, not from the loop's end,
        # which a loaded machine can reach long after it; 0.05 s of slack for mtime granularity)
        assert time.monotonic() - last_write >= 0.25
    finally:
        collector.stop()


def test_folder_old_files_count_as_settled(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    urls = touch_all(folder, ["b.tar", "a.tar"])
    old = time.time() - 60
    os.utime(urls[0], (old, old))
    os.utime(urls[1], (old + 1, old + 1))
    source = FolderSource(folder, poll_s=0.02, settle_s=30.0)
    assert source.scan() == ["b.tar", "a.tar"]  # oldest first


def test_folder_state_never_rereads_finished_shards(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    a, b = touch_all(folder, ["a.tar", "b.tar"])
    first = FolderSource(folder, poll_s=0.02, settle_s=0.0)
    collector = Collector(first)
    assert sorted(collector.wait_for(2)) == [a, b]
    collector.stop()
    first.mark_done(a)  # b stays open: the sample stream resumes it from its own state
    state = json.loads(json.dumps(first.state_dict()))
    assert state["done"] == ["a.tar"] and state["open"] == ["b.tar"]

    second = FolderSource(folder, poll_s=0.02, settle_s=0.0)
    second.load_state_dict(state)
    collector = Collector(second)
    (c,) = touch_all(folder, ["c.tar"])
    try:
        assert collector.wait_for(1) == [c]
        time.sleep(0.1)
        assert collector.urls == [c]
    finally:
        collector.stop()
    second.mark_done(b)
    second.mark_done(c)
    (folder / "a.tar").unlink()  # consumed shards deleted by the operator: the state shrinks with them
    second.scan()
    assert second.state_dict()["done"] == ["b.tar", "c.tar"]


def test_quiet_folder_drains_the_shuffle_buffer_and_acks(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    shard = write_shard(folder / "a.tar", 3)
    source = FolderSource(folder, poll_s=0.02, settle_s=0.0)
    stream = SampleStream(source, SourceConfig(shuffle_buffer=100))  # more than the folder holds
    it = iter(stream)
    try:
        samples = within(10, lambda: [next(it) for _ in range(3)], on_timeout=stream.close)
    finally:
        stream.close()
    assert sorted(s.index for s in samples) == [0, 1, 2]
    assert source.state_dict()["done"] == [shard.name]


# --------------------------------------------------------------------------------------------- redis


def test_publish_consume_ack_after_last_sample(redis_server, tmp_path: Path) -> None:
    a = str(write_shard(tmp_path / "a.tar", 3))
    ids = publish_urls(redis_server.url, [a])
    assert len(ids) == 1 and "-" in ids[0]
    conf = SourceConfig(urls=(redis_server.url,), poll_s=0.05, shuffle_buffer=0, consumer="learner-1")
    source = make_source(conf)
    assert isinstance(source, RedisStreamSource)
    stream = SampleStream(source, conf)
    it = iter(stream)
    try:
        first = within(10, lambda: [next(it), next(it)], on_timeout=stream.close)
        assert [s.index for s in first] == [0, 1]
        assert pending(redis_server.url) == 1  # two of three samples out: not acked
        last = within(10, lambda: next(it), on_timeout=stream.close)
        assert last.index == 2 and last.url == a
        assert pending(redis_server.url) == 0  # acked as the last sample left
    finally:
        stream.close()


def test_dead_consumer_shard_is_reclaimed(redis_server, tmp_path: Path) -> None:
    a = str(write_shard(tmp_path / "a.tar", 1))
    publish_urls(redis_server.url, [a])
    dead = RedisStreamSource(redis_server.url, consumer="dead", poll_s=0.05, claim_idle_s=0.3)
    dead_it = iter(dead)
    assert next_url(dead_it, dead) == a
    # "dead" stops here: no ack, no more reads
    other = RedisStreamSource(redis_server.url, consumer="other", poll_s=0.05, claim_idle_s=0.3)
    other_it = iter(other)
    t = time.monotonic()
    assert next_url(other_it, other) == a
    assert time.monotonic() - t >= 0.2  # only once idle for claim_idle_s
    assert pending(redis_server.url) == 1
    other.mark_done(a)
    assert pending(redis_server.url) == 0
    dead.close()
    other.close()


def test_open_shard_is_kept_alive_while_its_learner_reads(redis_server, tmp_path: Path) -> None:
    urls = [str(write_shard(tmp_path / f"{k}.tar", 1)) for k in range(2)]
    publish_urls(redis_server.url, urls[:1])
    busy = RedisStreamSource(redis_server.url, consumer="busy", poll_s=0.05, claim_idle_s=0.4)
    collector = Collector(busy)  # keeps asking for shards while holding the first one open
    try:
        assert collector.wait_for(1) == urls[:1]
        time.sleep(0.8)  # twice claim_idle_s: the open shard's idle time was reset by every poll
        thief = RedisStreamSource(redis_server.url, consumer="thief", poll_s=0.05, claim_idle_s=0.4)
        thief_collector = Collector(thief)
        time.sleep(0.3)
        thief_collector.stop()
        assert thief_collector.urls == []
    finally:
        collector.stop()


def test_redis_restart_while_polling_loses_nothing(redis_server, tmp_path: Path) -> None:
    a, b, c = (str(write_shard(tmp_path / f"{k}.tar", 1)) for k in "abc")
    source = RedisStreamSource(redis_server.url, consumer="c1", poll_s=0.05, claim_idle_s=60, max_backoff_s=0.2)
    collector = Collector(source)
    try:
        publish_urls(redis_server.url, [a])
        assert collector.wait_for(1) == [a]
        source.mark_done(a)
        redis_server.stop()  # killed while the consumer waits in XREADGROUP
        time.sleep(0.5)
        assert collector.thread.is_alive()
        redis_server.start()  # empty: the fixture's server keeps nothing on disk
        publish_urls(redis_server.url, [b, c])
        assert collector.wait_for(3) == [a, b, c]
        assert collector.error is None and source.n_reconnects >= 1
    finally:
        collector.stop()
    assert collector.error is None


def test_ack_during_outage_is_retried_after_restart(redis_server, tmp_path: Path) -> None:
    a, b = (str(write_shard(tmp_path / f"{k}.tar", 1)) for k in "ab")
    publish_urls(redis_server.url, [a, b])
    source = RedisStreamSource(redis_server.url, consumer="c1", poll_s=0.05, claim_idle_s=60, max_backoff_s=0.2)
    it = iter(source)
    assert next_url(it, source) == a
    client = redis.Redis.from_url(redis_server.url)
    client.save()  # so that the restarted server has the group and a pending on c1
    client.close()
    redis_server.stop()
    source.mark_done(a)  # Redis is down: must not raise; the XACK waits
    redis_server.start()
    assert pending(redis_server.url) == 1  # still pending: the ack has not reached Redis yet
    assert next_url(it, source) == b  # not a again: nothing redelivered
    state = source.state_dict()
    assert state["open"][0][0] == b
    assert pending(redis_server.url) == 1  # a acked on the first call after the restart; b pending
    source.mark_done(b)
    assert pending(redis_server.url) == 0
    source.close()


def test_refused_urls_from_redis_are_counted_and_acked(redis_server, tmp_path: Path) -> None:
    good = str(write_shard(tmp_path / "good.tar", 2))
    hostile = [f"pipe:touch {tmp_path / 'ran'}", "s3://bucket/x.tar"]
    for url in hostile:  # publish_urls refuses them too: a producer that skips it puts them there with XADD
        with pytest.raises(SourceError):
            publish_urls(redis_server.url, [url])
    client = redis.Redis.from_url(redis_server.url)
    for url in [*hostile, good]:
        client.xadd("streamssl:shards", {"url": url})
    client.close()
    conf = SourceConfig(urls=(redis_server.url,), poll_s=0.05, shuffle_buffer=0, consumer="c1")
    bad: Counter[str] = Counter()
    stream = SampleStream(make_source(conf), conf, on_bad=lambda r: bad.update([r]))
    it = iter(stream)
    try:
        samples = within(10, lambda: [next(it), next(it)], on_timeout=stream.close)
    finally:
        stream.close()
    assert [s.url for s in samples] == [good, good]
    assert bad == Counter({"refused_url": 2})
    assert pending(redis_server.url) == 0
    assert not (tmp_path / "ran").exists()


def test_resume_claims_open_entries_under_a_new_consumer_name(redis_server, tmp_path: Path) -> None:
    a, b = (str(write_shard(tmp_path / f"{k}.tar", 1)) for k in "ab")
    publish_urls(redis_server.url, [a])
    old = RedisStreamSource(redis_server.url, consumer="old-pid", poll_s=0.05, claim_idle_s=60)
    old_it = iter(old)
    assert next_url(old_it, old) == a
    state = json.loads(json.dumps(old.state_dict()))
    old.close()

    new = RedisStreamSource(redis_server.url, consumer="new-pid", poll_s=0.05, claim_idle_s=60)
    new.load_state_dict(state)
    publish_urls(redis_server.url, [b])
    new_it = iter(new)
    assert next_url(new_it, new) == b  # a is resumed, not handed out again
    new.mark_done(a)
    new.mark_done(b)
    assert pending(redis_server.url) == 0
    new.close()


def test_redis_password_url(redis_server, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.config_set("requirepass", "s3cret")
    client.close()
    url = f"redis://:s3cret@127.0.0.1:{redis_server.port}/0"
    a = str(write_shard(tmp_path / "a.tar", 1))
    publish_urls(url, [a])
    source = RedisStreamSource(url, consumer="c1", poll_s=0.05)
    it = iter(source)
    assert next_url(it, source) == a
    source.close()
    for bad_url in (f"redis://:wrong@127.0.0.1:{redis_server.port}/0", f"redis://127.0.0.1:{redis_server.port}/0"):
        with pytest.raises(RedisAuthError, match="refused our credentials") as err:
            publish_urls(bad_url, [a])
        assert err.value.exit_code == 2 and "wrong" not in str(err.value)
        # a learner with a wrong or missing password stops with the reason instead of retrying forever
        source = RedisStreamSource(bad_url, consumer="c2", poll_s=0.05)
        with pytest.raises(RedisAuthError, match="check the password"):
            within(10, lambda source=source: next(iter(source)), on_timeout=source.close)
        source.close()


def test_redis_client_urls() -> None:
    tls = redis_client("rediss://:pw@127.0.0.1:1/0")
    assert "SSL" in tls.connection_pool.connection_class.__name__
    assert tls.connection_pool.connection_kwargs["password"] == "pw"
    with pytest.raises(SourceError):
        redis_client("http://127.0.0.1:1/0")
    default = RedisStreamSource("redis://127.0.0.1:1/0")
    assert default.consumer == f"{socket.gethostname()}-{os.getpid()}"


# --------------------------------------------------------------------------------------------- make_source


def test_make_source_chooses_the_kind(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="empty"):
        make_source(SourceConfig(urls=()))
    assert isinstance(make_source(SourceConfig(urls=("redis://127.0.0.1:1/0",))), RedisStreamSource)
    assert isinstance(make_source(SourceConfig(urls=("rediss://127.0.0.1:1/0",))), RedisStreamSource)
    assert isinstance(make_source(SourceConfig(urls=(str(tmp_path),))), FolderSource)
    shards = touch_all(tmp_path / "s", ["0.tar", "1.tar"])
    pattern = make_source(SourceConfig(urls=(str(tmp_path / "s" / "{0..1}.tar"),), cycle=False))
    assert isinstance(pattern, PatternSource) and list(pattern) == shards
    # refused schemes stop the configuration itself, before any source is made
    with pytest.raises(ConfigError, match=re.escape("ftp://host/a.tar")):
        SourceConfig(urls=("ftp://host/a.tar",))
    with pytest.raises(ConfigError, match="pipe:"):
        SourceConfig(urls=("pipe:cat a.tar",))
    with pytest.raises(ConfigError, match=r"(?i)port out of range"):
        SourceConfig(urls=("redis://127.0.0.1:99999/0",))
    assert isinstance(make_source(SourceConfig(urls=("pipe:cat a.tar",), allow_pipe=True)), PatternSource)
    with pytest.raises(SourceError, match="only source"):
        make_source(SourceConfig(urls=("redis://127.0.0.1:1/0", shards[0])))


def test_sources_are_generators_of_urls(tmp_path: Path) -> None:
    urls = touch_all(tmp_path, ["a.tar"])
    source = PatternSource(urls, cycle=True)
    it: Iterator[str | None] = iter(source)
    assert [next(it) for _ in range(3)] == urls * 3
    source.close()
    assert list(it) == []
