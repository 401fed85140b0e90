"""Replay: a bounded buffer of encoded samples between the stream and the augment stage, so that training
follows the buffer's distribution rather than the order in which the stream arrives.

Real ingest streams are correlated (one camera, one crawl, one class per shard); a shuffle buffer of a few
thousand samples cannot mix content that changes every 10^5 images. Purushwalkam, Morgado and Gupta ("The
Challenges of Continuous Self-Supervised Learning", ECCV 2022) train from a replay buffer and compare its
policies; this module has them, each a way to choose which sample leaves when the buffer is full:

``fifo``       the oldest leaves: the buffer is the recent past (their "FIFO" baseline).
``reservoir``  reservoir sampling (Vitter's algorithm R): after n arrivals every one of them is in the buffer
               with the same probability capacity / n, so the buffer is a uniform sample of the whole stream.
``minred``     minimum redundancy (the paper's MinRed): the sample most similar to its nearest neighbour in the
               buffer leaves (cosine similarity of embeddings the learner already computed for it; of a pair
               of mutual nearest neighbours, the older one), so the buffer keeps what is most diverse. A
               sample not yet embedded (not trained on yet) is never the one chosen; while no two samples
               have embeddings, the oldest leaves.

Bounds: at most ``max_samples`` samples and ``max_bytes`` encoded bytes; a sample larger than ``max_bytes``
alone is refused. Training draws from the buffer uniformly (``draw``); how often per arrival is the replay
ratio of ``ReplayStream``.

Nearest neighbours are kept incrementally: each embedded sample knows its nearest neighbour and their
similarity. A batch of new embeddings costs one (N, D) x (D, M) product (every sample against the M new ones,
which also gives the new ones their neighbours); a sample whose neighbour left or moved away is searched again
lazily, all of them in one product at the next batch of embeddings (until then it is not a candidate for
eviction). No N x N matrix is ever held. ``benchmarks/replay_cost.py`` measures the cost per step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamssl.stream.shards import Sample

POLICIES = ("none", "fifo", "reservoir", "minred")
_FIELDS = ("key", "data", "ext", "url", "index", "label")


@dataclass
class ReplayStats:
    """Counters of a buffer since it was made (or restored)."""

    added: int = 0       # samples that arrived
    refused: int = 0     # arrivals not kept (reservoir's coin, or larger than max_bytes)
    evicted: int = 0     # samples that left to make room
    drawn: int = 0       # samples handed to training


class ReplayBuffer:
    """A bounded set of samples with an eviction policy (see the module docstring)."""

    def __init__(self, policy: str, max_samples: int, max_bytes: int, *, seed: int = 0) -> None:
        if policy not in POLICIES or policy == "none":
            raise ValueError(f"replay policy {policy!r}: one of fifo, reservoir, minred")
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("replay buffer: max_samples and max_bytes must be >= 1")
        self.policy, self.max_samples, self.max_bytes = policy, max_samples, max_bytes
        self.rng = np.random.default_rng(seed)
        self._reset()

    def _reset(self) -> None:
        max_samples = self.max_samples
        self.samples: list[Sample] = []   # dense; a slot's position changes when another leaves
        self.arrival = np.zeros(max_samples, dtype=np.int64)  # arrival number of each slot (older: smaller)
        self.index: dict[str, int] = {}   # sample id -> slot
        self.nbytes = 0
        self.seen = 0                     # arrivals so far (reservoir's n)
        self.stats = ReplayStats()
        # MinRed's embeddings and nearest neighbours, one row per slot
        self.emb: np.ndarray | None = None        # (max_samples, D) float32, unit rows
        self.has_emb = np.zeros(max_samples, dtype=bool)
        self.nn = np.full(max_samples, -1, dtype=np.int64)
        self.nn_sim = np.full(max_samples, -np.inf, dtype=np.float32)
        self.pending = np.zeros(max_samples, dtype=bool)  # embedded, neighbour to be searched again

    def __len__(self) -> int:
        return len(self.samples)

    # -- arrivals and evictions ---------------------------------------------------------------------------

    def add(self, sample: Sample) -> None:
        """Take an arriving sample (or refuse it), evicting by the policy to stay within the bounds."""
        self.seen += 1
        self.stats.added += 1
        size = len(sample.data)
        if size > self.max_bytes:
            self.stats.refused += 1
            return
        if sample.id in self.index:  # the same image again (a cycled stream): keep the newer copy
            self._remove(self.index[sample.id])
        if self.policy == "reservoir" and len(self.samples) >= self.max_samples:
            j = int(self.rng.integers(self.seen))
            if j >= self.max_samples:
                self.stats.refused += 1
                return
            self._remove(j)  # Vitter's R: the arrival replaces slot j
            self.stats.evicted += 1
        while self.samples and (len(self.samples) >= self.max_samples or self.nbytes + size > self.max_bytes):
            self._remove(self._victim())
            self.stats.evicted += 1
        slot = len(self.samples)
        self.samples.append(sample)
        self.arrival[slot] = self.seen
        self.index[sample.id] = slot
        self.nbytes += size
        self.has_emb[slot] = self.pending[slot] = False
        self.nn[slot], self.nn_sim[slot] = -1, -np.inf

    def remove(self, sample_id: str) -> None:
        """Take one sample out (not an eviction: the policy did not choose it)."""
        self._remove(self.index[sample_id])

    def _victim(self) -> int:
        n = len(self.samples)
        if self.policy == "fifo":
            return int(np.argmin(self.arrival[:n]))
        if self.policy == "reservoir":  # only the byte bound gets here: a random one, keeping it uniform
            return int(self.rng.integers(n))
        sims = np.where(self.has_emb[:n] & (self.nn[:n] >= 0), self.nn_sim[:n], -np.inf)
        best = float(sims.max()) if n else -np.inf
        if not np.isfinite(best):
            return int(np.argmin(self.arrival[:n]))  # nothing to compare yet: the oldest
        pair = np.flatnonzero(sims == best)
        return int(pair[np.argmin(self.arrival[pair])])  # of the most redundant, the oldest

    def _remove(self, slot: int) -> None:
        sample = self.samples[slot]
        self.nbytes -= len(sample.data)
        del self.index[sample.id]
        last = len(self.samples) - 1
        orphans = [int(i) for i in np.flatnonzero(self.nn[: last + 1] == slot)]  # their neighbour leaves
        if slot != last:  # move the last slot into the hole
            moved = self.samples[last]
            self.samples[slot] = moved
            self.index[moved.id] = slot
            for array in (self.arrival, self.has_emb, self.nn, self.nn_sim, self.pending):
                array[slot] = array[last]
            if self.emb is not None:
                self.emb[slot] = self.emb[last]
            live = self.nn[:last]
            live[live == last] = slot
            orphans = [slot if i == last else i for i in orphans]
        self.samples.pop()
        self.has_emb[last], self.pending[last], self.nn[last], self.nn_sim[last] = False, False, -1, -np.inf
        for i in orphans:  # look again, at the next batch of embeddings
            if i < len(self.samples):
                self.nn[i], self.nn_sim[i], self.pending[i] = -1, -np.inf, bool(self.has_emb[i])

    # -- MinRed's embeddings ------------------------------------------------------------------------------

    def update_embeddings(self, ids: Sequence[str], embeddings: Any) -> int:
        """Give (or refresh) the embeddings of the samples ``ids`` (rows of ``embeddings``, any (N, D) array or
        tensor; normalised here). Ids no longer in the buffer are ignored; returns how many were taken."""
        if self.policy != "minred":
            return 0
        rows = np.asarray(embeddings.detach().float().cpu() if hasattr(embeddings, "detach") else embeddings,
                          dtype=np.float32)
        if rows.ndim != 2 or len(rows) != len(ids):
            raise ValueError(f"update_embeddings: {len(ids)} ids and embeddings of shape {rows.shape}")
        if self.emb is None:
            self.emb = np.zeros((self.max_samples, rows.shape[1]), dtype=np.float32)
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        pairs = {self.index[i]: row for i, row in zip(ids, rows, strict=True) if i in self.index}
        if not pairs:
            return 0
        slots = np.fromiter(pairs, dtype=np.int64)
        self.emb[slots] = np.stack(list(pairs.values()))
        self.has_emb[slots] = True
        n = len(self.samples)
        # one (m, n) product: the m new embeddings against every sample (rows contiguous: fast reductions)
        sims = self._masked(slots, self.emb[slots] @ self.emb[:n].T)
        best = sims.max(axis=0)  # (n,): each sample's most similar new embedding
        was_updated = np.zeros(n, dtype=bool)
        was_updated[slots] = True
        stale = np.isin(self.nn[:n], slots) & ~was_updated  # their neighbour moved: its old similarity is void
        closer = self.has_emb[:n] & ~was_updated & (best > np.where(stale, np.inf, self.nn_sim[:n]))
        # a stale one whose best new similarity beats its old one still has that neighbour (nothing else
        # changed, and the old one was the best of the rest)
        keeps = stale & (best >= self.nn_sim[:n])
        take = np.flatnonzero(closer | keeps)
        self.nn[take], self.nn_sim[take] = slots[sims[:, take].argmax(axis=0)], best[take]
        self._set_nn(slots, sims)  # the new ones' neighbours: the rows of the same product
        self.pending[:n] |= stale & ~keeps  # the rest look again, in full, with the orphans of evictions
        self.refresh_neighbours()
        return len(slots)

    def refresh_neighbours(self) -> None:
        """Search again, in one product, the neighbours of the samples whose neighbour left or moved away."""
        n = len(self.samples)
        todo = np.flatnonzero(self.pending[:n] & self.has_emb[:n])
        self.pending[:n] = False
        if len(todo) and self.emb is not None:
            self._set_nn(todo, self._masked(todo, self.emb[todo] @ self.emb[:n].T))

    def _masked(self, slots: np.ndarray, sims: np.ndarray) -> np.ndarray:
        """``sims`` (len(slots), n), each of ``slots`` against every sample, without the samples not embedded
        and without each slot itself (not one's own neighbour)."""
        sims[:, ~self.has_emb[: sims.shape[1]]] = -np.inf
        sims[np.arange(len(slots)), slots] = -np.inf
        return sims

    def _set_nn(self, slots: np.ndarray, sims: np.ndarray) -> None:
        """Nearest neighbours of ``slots`` from their masked similarities ``sims`` (len(slots), n)."""
        j = sims.argmax(axis=1)
        best = sims[np.arange(len(slots)), j]
        found = np.isfinite(best)
        self.nn[slots] = np.where(found, j, -1)
        self.nn_sim[slots] = np.where(found, best, -np.inf)

    def redundancy(self) -> float | None:
        """Mean cosine similarity of each embedded sample to its nearest neighbour (None: fewer than 2)."""
        self.refresh_neighbours()
        n = len(self.samples)
        ok = self.has_emb[:n] & (self.nn[:n] >= 0)
        return float(self.nn_sim[:n][ok].mean()) if ok.any() else None

    # -- training draws -----------------------------------------------------------------------------------

    def draw(self) -> Sample:
        """One sample of the buffer, uniformly at random."""
        self.stats.drawn += 1
        return self.samples[int(self.rng.integers(len(self.samples)))]

    # -- checkpoints --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The buffer's samples (their encoded bytes: a checkpoint covers what the buffer holds, so the stream
        position can move past them), embeddings, counters and random state."""
        n = len(self.samples)  # plain containers and bytes only: checkpoints load with weights_only=True
        emb = None if self.emb is None else {"dim": int(self.emb.shape[1]), "data": self.emb[:n].tobytes()}
        return {"policy": self.policy, "seen": self.seen, "arrival": self.arrival[:n].tolist(),
                "samples": [{f: getattr(s, f) for f in _FIELDS} for s in self.samples],
                "emb": emb, "has_emb": self.has_emb[:n].tobytes(),
                "rng": self.rng.bit_generator.state,
                "stats": {"added": self.stats.added, "refused": self.stats.refused, "evicted": self.stats.evicted,
                          "drawn": self.stats.drawn}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refill from ``state_dict()``; samples beyond this buffer's bounds (a smaller buffer) are dropped,
        the oldest first."""
        samples = [Sample(**s) for s in state["samples"]]
        arrival = [int(a) for a in state["arrival"]]
        self._reset()
        self.rng.bit_generator.state = state["rng"]
        # the newest that fit this buffer's bounds, in their saved slot order (so the same buffer continues
        # exactly as it would have: reservoir replaces by slot)
        fits, count, size = set(), 0, 0
        for i in sorted(range(len(samples)), key=lambda i: -arrival[i]):
            if count < self.max_samples and size + len(samples[i].data) <= self.max_bytes:
                fits.add(i)
                count, size = count + 1, size + len(samples[i].data)
        keep = [i for i in range(len(samples)) if i in fits]
        for i in keep:
            self.index[samples[i].id] = len(self.samples)
            self.arrival[len(self.samples)] = arrival[i]
            self.samples.append(samples[i])
            self.nbytes += len(samples[i].data)
        self.seen = int(state["seen"])
        stats = state.get("stats", {})
        self.stats = ReplayStats(**{k: int(v) for k, v in stats.items()})
        if state.get("emb") is not None and self.policy == "minred":
            emb = np.frombuffer(state["emb"]["data"], dtype=np.float32).reshape(-1, state["emb"]["dim"])
            has = np.frombuffer(state["has_emb"], dtype=bool)
            embedded = [i for i in keep if has[i] and samples[i].id in self.index]
            if embedded:
                self.update_embeddings([samples[i].id for i in embedded], emb[embedded])


class ReplayStream:
    """Samples for training, drawn from a ``ReplayBuffer`` that the incoming stream fills.

    Every arriving sample enters the buffer; once it holds ``min_fill`` samples, ``ratio`` draws follow each
    arrival on average (the replay ratio: 1 trains on as many samples as arrive, 4 on four times as many,
    0.5 on half). Before the fill nothing is drawn: the first batch waits for it.

    The stream is iterated in one thread (the feeder's) while another (the learner's) gives embeddings back and
    checkpoints the buffer: every touch of the buffer holds ``lock``, never across a ``yield``.
    """

    def __init__(self, incoming: Iterable[Sample], buffer: ReplayBuffer, *, ratio: float = 1.0,
                 min_fill: int = 1) -> None:
        if ratio <= 0:
            raise ValueError(f"replay ratio must be > 0, got {ratio}")
        self.incoming, self.buffer, self.ratio = incoming, buffer, ratio
        self.min_fill = max(1, min(min_fill, buffer.max_samples))
        self.credit = 0.0
        self.lock = threading.Lock()

    def __iter__(self) -> Iterator[Sample]:
        for sample in self.incoming:
            with self.lock:
                self.buffer.add(sample)
                if len(self.buffer) < self.min_fill:
                    continue
                self.credit += self.ratio
                draws = []
                while self.credit >= 1.0:
                    self.credit -= 1.0
                    draws.append(self.buffer.draw())
            yield from draws

    def discard(self, ids: Iterable[str]) -> None:
        """Take samples out of the buffer (the augment stage could not decode them: never draw them again)."""
        with self.lock:
            for i in ids:
                if i in self.buffer.index:
                    self.buffer.remove(i)

    def update_embeddings(self, ids: Sequence[str], embeddings: Any) -> int:
        """``ReplayBuffer.update_embeddings``, from the learner's thread."""
        with self.lock:
            return self.buffer.update_embeddings(ids, embeddings)

    def snapshot(self) -> dict[str, float]:
        """What the buffer holds and did, for metrics: samples, bytes, fill (of max_samples), the counters of
        ``ReplayStats``, the achieved replay ratio (draws per arrival) and redundancy (MinRed; else nan)."""
        with self.lock:
            b, stats = self.buffer, self.buffer.stats
            redundancy = b.redundancy()
            return {"samples": len(b), "bytes": b.nbytes, "fill": len(b) / b.max_samples, "added": stats.added,
                    "refused": stats.refused, "evicted": stats.evicted, "drawn": stats.drawn,
                    "ratio": stats.drawn / stats.added if stats.added else 0.0,
                    "redundancy": float("nan") if redundancy is None else redundancy}

    def state_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"buffer": self.buffer.state_dict(), "credit": self.credit}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self.lock:
            self.buffer.load_state_dict(state["buffer"])
            self.credit = float(state.get("credit", 0.0))


__all__ = ["POLICIES", "ReplayBuffer", "ReplayStats", "ReplayStream"]
