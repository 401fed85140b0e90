"""The daemon's side of several ranks: stepping together, and each rank's part of a checkpoint.

**Stepping together.** An open-ended stream is uneven: one rank's source can be idle while the others have
batches. A rank must never enter a step's collectives (DDP's gradients, Sinkhorn's sums) alone, or the
others would wait in it until the collective timeout kills the job. So before every step the ranks agree,
in one small all-reduce (``StepGate``), on four things: whether any rank was signalled (all stop at this
step), whether any rank's stream ended or failed (all stop), whether every rank holds a batch (else all wait
together, keeping the batches they hold, and poll again: the all-reduce every half second keeps the group
alive), and the largest elapsed time (so that time budgets, time-based checkpoints and the ``budget`` learning
rate schedule are the same on every rank). One process needs none of it: ``StepGate`` is then the feeder's
own blocking iteration.

**Checkpoint parts.** Parameters and optimizer state are identical on every rank (DDP), and so are the
methods' memories that are fed by every rank (MoCo's queue, NPID's bank). What is a rank's own: its RNG
states, its stream position, its replay buffer and its method state (SwAV's share of the queue). Rank 0
gathers them into the checkpoint it writes (``ranks``: one entry per rank); on resume each rank takes its own,
or, with another world size, a merge: ``merge_positions`` and the method's ``merge_rank_states``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from streamssl import distributed
from streamssl.distributed import World
from streamssl.learner.methods.base import Method
from streamssl.service.feeder import END, Batch, Feeder
from streamssl.stream.reshard import merge_positions

log = logging.getLogger("streamssl.service.daemon")

STOP, ENDED, WAITING, DUE = range(4)  # the flags of the gate's all-reduce; then the elapsed time


class StepGate:
    """The next batch every rank trains on, or None when the run stops (see the module docstring).

    ``batches``: the feeder's batches as one process iterates them. ``stopping()``: this rank was signalled.
    ``due()``: this rank's clock wants a checkpoint. ``idle(seconds)``: called while waiting, with the seconds
    the job has waited by the job's clock (the same on every rank in the same round, so a collective
    decided on it, such as an idle checkpoint, is taken by all ranks together). After each batch,
    ``checkpoint_due`` and ``elapsed_s`` are the job's.
    """

    def __init__(self, feeder: Feeder, world: World, batches: Iterator[Batch], *, start: float, wait_log_s: float,
                 stopping: Callable[[], bool], due: Callable[[], bool], idle: Callable[[float], None],
                 device: torch.device) -> None:
        self.feeder, self.world, self.start = feeder, world, start
        self.wait_log_s = wait_log_s
        self.stopping, self.due, self.idle = stopping, due, idle
        self.device = device
        self.checkpoint_due = False
        self.elapsed_s = 0.0
        self.waits = 0  # gate rounds in which some rank had no batch
        self._held: Batch | None = None
        self._ended = False
        self._drain = None if world.distributed else batches  # one process: the feeder's own iteration

    def next(self) -> Batch | None:
        if self._drain is not None:  # one process: nothing to agree on
            self.elapsed_s = time.monotonic() - self.start
            return next(self._drain, None)
        waiting_since: float | None = None
        job_waiting_since: float | None = None  # by the job's clock (the all-reduced elapsed time)
        while True:
            if self._held is None and not self._ended:
                item = self.feeder.poll(0.5)
                if item is END:
                    self._ended = True
                elif item is not None:
                    self._held = item
            flags = torch.tensor([float(self.stopping()), float(self._ended), float(self._held is None),
                                  float(self.due()), time.monotonic() - self.start], device=self.device)
            flags = distributed.all_reduce_(flags, "max").tolist()
            self.elapsed_s = flags[-1]
            if flags[STOP] or flags[ENDED]:
                return None
            if not flags[WAITING]:
                batch, self._held = self._held, None
                self.checkpoint_due = bool(flags[DUE])
                return batch
            self.waits += 1
            job_waiting_since = self.elapsed_s if job_waiting_since is None else job_waiting_since
            now = time.monotonic()
            if waiting_since is None:
                waiting_since = now
            elif now - waiting_since >= self.wait_log_s:
                log.warning("rank %d: waiting %.0f s for a rank without a batch (its source is idle)%s",
                            self.world.rank, now - waiting_since,
                            "" if self._held is None else "; this rank holds one")
                waiting_since = now
            self.idle(self.elapsed_s - job_waiting_since)
            if self._ended or self._held is not None:
                time.sleep(0.5)  # nothing to poll here: pace the rounds as the feeder's poll does


def rank_part(rng: dict[str, Any], position: dict[str, Any] | None, replay: dict[str, Any] | None,
              method: Method) -> dict[str, Any]:
    """What this rank alone knows, for the checkpoint (CPU tensors, ready to gather)."""
    return distributed.to_cpu({"rng": rng, "position": position, "replay": replay, "extra": method.extra_state()})


def take_rank_part(state: dict[str, Any], world: World, method: Method) -> dict[str, Any]:
    """This rank's part of a checkpoint written by any number of ranks (one process: the checkpoint itself)."""
    parts = state.get("ranks") or [{"rng": state["rng"], "position": state.get("position"),
                                    "replay": state.get("replay"), "extra": state["learner"].get("extra", {})}]
    if len(parts) == world.size:
        return parts[world.rank]
    log.warning("the checkpoint was written by %d ranks, this job has %d: stream positions and per-rank state "
                "merged (no shard lost; shards open mid-way may be read again)", len(parts), world.size)
    own = parts[world.rank] if world.rank < len(parts) else None
    rng = own["rng"] if own is not None else _reseeded(parts[0]["rng"], world.rank)
    return {"rng": rng, "position": merge_positions([p.get("position") for p in parts], world.rank, world.size),
            "replay": own["replay"] if own is not None else None,
            "extra": method.merge_rank_states([p["extra"] for p in parts], world.rank, world.size)}


def _reseeded(rng: dict[str, Any], rank: int) -> dict[str, Any]:
    """A new rank's RNG: rank 0's, drawn on by the rank index (its augmentations differ from rank 0's)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.set_rng_state(rng["torch"])
        torch.manual_seed(int(torch.randint(0, 2**31, ())) + rank)
        state = torch.random.get_rng_state()
    return {**rng, "torch": state}


__all__ = ["StepGate", "rank_part", "take_rank_part"]
