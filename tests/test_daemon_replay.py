"""The replay stage in the daemon: every policy end to end, its checkpoint and resume, the acknowledgement rule
with a Redis source, undecodable samples leaving the buffer, its metrics."""

from __future__ import annotations

import queue
from collections import Counter
from pathlib import Path

import pytest
import redis
import torch
from prometheus_client import CollectorRegistry

from streamssl.service.checkpoint import CheckpointManager
from streamssl.service.daemon import Daemon
from streamssl.service.feeder import END, Feeder, make_data_path
from streamssl.stream.redis_source import publish_urls
from streamssl.stream.replay import ReplayBuffer, ReplayStream
from streamssl.stream.shards import Sample
from tests.synthetic import ListStream
from tests.test_daemon import config, make_shards

REPLAY = ["replay.max_samples=24", "replay.min_fill=12", "replay.ratio=2", "metrics.port=-1"]


def urls_of(shards: list[str]) -> str:
    return "source.urls=[" + ", ".join(f'"{s}"' for s in shards) + "]"


def saved_ids(state: dict) -> list[str]:
    return [f"{s['url']}#{s['key']}" for s in state["replay"]["buffer"]["samples"]]


@pytest.mark.parametrize("policy", ["fifo", "reservoir", "minred"])
def test_daemon_trains_from_each_replay_policy_and_resumes_its_buffer(tmp_path: Path, policy: str) -> None:
    shards = make_shards(tmp_path, 6)  # 48 images, 8 a batch
    common = [urls_of(shards), "source.cycle=false", f"replay.policy={policy}", *REPLAY]
    registry = CollectorRegistry()
    first = Daemon(config(tmp_path, *common, "run.max_steps=4"), registry=registry, echo=lambda _: None)
    summary = first.run()
    assert summary.steps == 4 and summary.images == 32
    # 12 arrivals fill the buffer, then 2 draws per arrival: 32 draws need 16 more arrivals (28 in all); the
    # feeder may have prefetched further, so the counters are at least that
    value = registry.get_sample_value
    assert value("streamssl_replay_arrivals_total") >= 27 and value("streamssl_replay_draws_total") >= 32
    assert 0 < value("streamssl_replay_samples") <= 24 and value("streamssl_replay_fill_ratio") <= 1
    assert value("streamssl_replay_draws_per_arrival") > 1
    state = CheckpointManager(tmp_path / "run").load()
    assert state["replay"] is not None and len(saved_ids(state)) <= 24
    assert state["replay"]["buffer"]["policy"] == policy
    if policy == "minred":  # the learner's embeddings came back for the samples it trained on
        assert state["replay"]["buffer"]["emb"]["dim"] == 16
        assert any(state["replay"]["buffer"]["has_emb"])
        assert value("streamssl_replay_redundancy") > 0

    # the data path of a resumed run starts from the checkpoint's buffer, as it was
    cfg = config(tmp_path, *common)
    _, feeder = make_data_path(cfg, torch.device("cpu"), position=state["position"], on_bad=lambda _: None,
                               ack=lambda _: None, echo=lambda _: None, replay_state=state["replay"])
    assert feeder.replay is not None and [s.id for s in feeder.replay.buffer.samples] == saved_ids(state)
    assert feeder.replay.buffer.stats.added == state["replay"]["buffer"]["stats"]["added"]

    second = Daemon(cfg, echo=lambda _: None)
    summary = second.run()  # resumes, then runs until the finite stream ends
    assert summary.steps > 4 and summary.images > 0  # steps count from the checkpoint's 4
    final = CheckpointManager(tmp_path / "run").load()
    stats = final["replay"]["buffer"]["stats"]
    assert stats["added"] >= 48  # the counters went on from the checkpoint's (the 48 images, some twice)


def test_a_shard_is_acked_only_when_a_checkpointed_buffer_holds_its_samples(tmp_path: Path, redis_server) -> None:
    shards = make_shards(tmp_path, 8)  # 8 shards x 8 images
    publish_urls(redis_server.url, shards)
    # a buffer that never evicts here (64 >= every arrival) and trains only after 20 arrivals: shards are read
    # well before their samples are trained on
    common = [f'source.urls=["{redis_server.url}"]', "source.consumer=learner-a", "replay.policy=fifo",
              "replay.max_samples=64", "replay.min_fill=20", "replay.ratio=1", "checkpoint.every_steps=2",
              "metrics.port=-1"]
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)

    def acked_and_buffered() -> tuple[list[str], Counter]:
        read = client.xinfo_groups("streamssl:shards")[0]["entries-read"]
        pending = {p["message_id"] for p in client.xpending_range("streamssl:shards", "learners", "-", "+", 100)}
        acked = [f["url"] for entry, f in client.xrange("streamssl:shards")[:read] if entry not in pending]
        state = CheckpointManager(tmp_path / "run").load()
        return acked, Counter(s["url"] for s in state["replay"]["buffer"]["samples"])

    Daemon(config(tmp_path, *common, "run.max_steps=3"), echo=lambda _: None).run()
    acked, buffered = acked_and_buffered()
    # 24 images trained on after 20 + 24 arrivals: more shards acked than trained on, and each acked shard's
    # 8 samples are in the buffer the last checkpoint holds
    assert len(acked) * 8 > 24, acked
    assert all(buffered[u] == 8 for u in acked), (acked, buffered)

    # a restart goes on from that checkpoint (its buffer already full enough to draw) and the rule still holds
    Daemon(config(tmp_path, *common, "run.max_images=40"), echo=lambda _: None).run()
    later, buffered = acked_and_buffered()
    assert len(later) > len(acked) and all(buffered[u] == 8 for u in later), (later, buffered)


def test_a_sample_the_multicrop_drops_leaves_the_replay_buffer() -> None:
    samples = [Sample(key=f"k{i}", data=b"bad" if i == 3 else bytes([i]) * 8, ext="png", url="u", index=i)
               for i in range(40)]
    calls_with_bad: list[int] = []

    def multicrop(chunk: list[bytes]):
        kept = [k for k, data in enumerate(chunk) if data != b"bad"]
        if len(kept) < len(chunk):
            calls_with_bad.append(len(calls))
        calls.append(len(chunk))
        return [torch.zeros(len(kept), 3, 4, 4)], kept

    calls: list[int] = []
    stream = ListStream(samples)
    replay = ReplayStream(stream, ReplayBuffer("fifo", 100, 10**6, seed=0), ratio=2, min_fill=4)
    feeder = Feeder(stream, multicrop, batch_size=4, prefetch=100, replay=replay)  # type: ignore[arg-type]
    feeder.run()  # in this thread, until the stream ends
    batches = []
    while (item := feeder.out.get_nowait()) is not END:
        batches.append(item)
    assert len(calls_with_bad) == 1  # drawn, dropped, gone: never drawn again
    assert "u#k3" not in replay.buffer.index and len(replay.buffer) == 39
    assert batches and all(len(b.ids) == 4 and "u#k3" not in b.ids for b in batches)
    with pytest.raises(queue.Empty):
        feeder.out.get_nowait()


@pytest.mark.parametrize("source", ["folder", "demo"])
def test_replay_on_a_followed_folder_and_on_the_demo_stream(tmp_path: Path, source: str) -> None:
    urls = [f'source.urls=["{Path(make_shards(tmp_path, 3)[0]).parent}"]'] if source == "folder" else []
    registry = CollectorRegistry()
    summary = Daemon(config(tmp_path, *urls, "replay.policy=reservoir", *REPLAY, "run.max_steps=3"),
                     registry=registry, echo=lambda _: None).run()
    assert summary.steps == 3 and summary.error is None
    assert registry.get_sample_value("streamssl_replay_draws_total") >= 24
    assert CheckpointManager(tmp_path / "run").load()["replay"]["buffer"]["policy"] == "reservoir"
