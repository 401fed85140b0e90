"""The replay buffer (stream/replay.py): each policy's invariants, the bounds, MinRed's bookkeeping, state."""

from __future__ import annotations

import numpy as np
import pytest

from streamssl.stream.replay import ReplayBuffer, ReplayStream
from streamssl.stream.shards import Sample


def sample(i: int, size: int = 10) -> Sample:
    return Sample(key=f"k{i:06d}", data=bytes([i % 251]) * size, ext="png", url="shard-0.tar", index=i)


def test_fifo_keeps_the_most_recent() -> None:
    buf = ReplayBuffer("fifo", max_samples=4, max_bytes=10**6)
    for i in range(10):
        buf.add(sample(i))
    assert sorted(s.index for s in buf.samples) == [6, 7, 8, 9]
    assert buf.stats.evicted == 6 and buf.stats.added == 10


@pytest.mark.parametrize("policy", ["fifo", "reservoir", "minred"])
def test_bounds_in_samples_and_bytes_hold(policy: str) -> None:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(policy, max_samples=20, max_bytes=1000, seed=1)
    for i in range(300):
        buf.add(sample(i, size=int(rng.integers(1, 120))))
        assert len(buf) <= 20 and buf.nbytes <= 1000
        assert buf.nbytes == sum(len(s.data) for s in buf.samples)
        assert {s.id: k for k, s in enumerate(buf.samples)} == buf.index
    buf.add(sample(999, size=1001))  # larger than the whole buffer: refused, nothing evicted for it
    assert sample(999).id not in buf.index


def test_reservoir_is_a_uniform_sample_of_the_whole_stream() -> None:
    # 400 runs of a 1,000-sample stream into 100 slots: each tenth of the stream should hold ~10% of the
    # buffer. A chi-square test at a fixed seed (9 degrees of freedom; 27.9 is the 0.1% critical value).
    counts = np.zeros(10)
    for run in range(400):
        buf = ReplayBuffer("reservoir", max_samples=100, max_bytes=10**6, seed=run)
        for i in range(1000):
            buf.add(sample(i))
        counts += np.bincount([s.index // 100 for s in buf.samples], minlength=10)
    expected = counts.sum() / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9, counts
    fifo = ReplayBuffer("fifo", max_samples=100, max_bytes=10**6)  # the same test tells FIFO apart
    for i in range(1000):
        fifo.add(sample(i))
    assert {s.index // 100 for s in fifo.samples} == {9}


def unit(v: list[float]) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_minred_evicts_the_older_of_the_most_redundant_pair() -> None:
    buf = ReplayBuffer("minred", max_samples=4, max_bytes=10**6)
    vectors = {0: [1, 0, 0], 1: [0, 1, 0], 2: [0.99, 0.1, 0], 3: [0, 0, 1]}  # 0 and 2 nearly the same
    for i in range(4):
        buf.add(sample(i))
    buf.update_embeddings([sample(i).id for i in vectors], np.stack([unit(v) for v in vectors.values()]))
    assert buf.redundancy() is not None
    buf.add(sample(4))  # full: the most redundant leaves, and of the pair (0, 2) the older one
    assert sorted(s.index for s in buf.samples) == [1, 2, 3, 4]
    buf.add(sample(5))  # 4 has no embedding yet and can't be chosen; 2 now has 1 as nearest: cos 0.1
    assert 4 in {s.index for s in buf.samples}


def test_minred_without_embeddings_evicts_the_oldest() -> None:
    buf = ReplayBuffer("minred", max_samples=3, max_bytes=10**6)
    for i in range(5):
        buf.add(sample(i))
    assert sorted(s.index for s in buf.samples) == [2, 3, 4]


def brute_force_nn(buf: ReplayBuffer) -> dict[str, float]:
    n = len(buf)
    out = {}
    for i in range(n):
        if not buf.has_emb[i]:
            continue
        sims = [float(buf.emb[j] @ buf.emb[i]) for j in range(n) if j != i and buf.has_emb[j]]
        if sims:
            out[buf.samples[i].id] = max(sims)
    return out


def test_minred_nearest_neighbours_match_a_brute_force_search() -> None:
    rng = np.random.default_rng(3)
    buf = ReplayBuffer("minred", max_samples=30, max_bytes=10**6, seed=0)
    for i in range(400):
        buf.add(sample(i))
        if rng.random() < 0.5:  # some arrivals are trained on (embedded), some embeddings are refreshed
            ids = [s.id for s in buf.samples[-3:]] + [buf.samples[int(rng.integers(len(buf)))].id]
            buf.update_embeddings(ids, rng.normal(size=(len(ids), 8)))
        if i % 20 == 0:
            pending = buf.pending[:len(buf)] & buf.has_emb[:len(buf)]
            assert (buf.nn[:len(buf)][pending] == -1).all()  # an orphan waits, and is no eviction candidate
            buf.refresh_neighbours()  # what the next batch of embeddings does first
            expected = brute_force_nn(buf)
            for sid, sim in expected.items():
                slot = buf.index[sid]
                assert buf.nn_sim[slot] == pytest.approx(sim, abs=1e-5)
                assert buf.has_emb[buf.nn[slot]] and buf.nn[slot] != slot
    assert len(buf) == 30


@pytest.mark.parametrize("policy", ["fifo", "reservoir", "minred"])
def test_state_round_trip_gives_the_same_buffer_and_draws(policy: str) -> None:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(policy, max_samples=16, max_bytes=10**6, seed=5)
    for i in range(50):
        buf.add(sample(i))
    buf.update_embeddings([s.id for s in buf.samples], rng.normal(size=(len(buf), 4)))
    state = buf.state_dict()
    twin = ReplayBuffer(policy, max_samples=16, max_bytes=10**6, seed=99)
    twin.load_state_dict(state)
    assert sorted(s.id for s in twin.samples) == sorted(s.id for s in buf.samples)
    assert twin.nbytes == buf.nbytes and twin.seen == buf.seen and twin.stats.evicted == buf.stats.evicted
    if policy == "minred":
        assert twin.redundancy() == pytest.approx(buf.redundancy())
    for i in range(50, 60):  # the restored buffer goes on exactly as the original: same evictions, same draws
        buf.add(sample(i))
        twin.add(sample(i))
    assert [s.id for s in twin.samples] == [s.id for s in buf.samples]
    assert [buf.draw().id for _ in range(20)] == [twin.draw().id for _ in range(20)]
    smaller = ReplayBuffer(policy, max_samples=4, max_bytes=10**6)
    smaller.load_state_dict(state)  # a smaller buffer keeps the newest
    assert len(smaller) == 4


def test_replay_stream_draws_ratio_samples_per_arrival_after_the_fill() -> None:
    buf = ReplayBuffer("fifo", max_samples=50, max_bytes=10**6)
    drawn = list(ReplayStream((sample(i) for i in range(200)), buf, ratio=2.5, min_fill=40))
    assert len(drawn) == int(2.5 * (200 - 39))  # from the 40th arrival on
    assert buf.stats.drawn == len(drawn)
    with pytest.raises(ValueError, match="ratio"):
        ReplayStream([], buf, ratio=0)
