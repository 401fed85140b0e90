"""The rolling feature queue of SwAV (Caron et al. 2020, section 4 / A.1 "small batch" training).

With a batch much smaller than the number of prototypes, equipartition over B samples is meaningless
(B/K < 1 sample per prototype). The queue keeps the normalised embeddings of the assignment views of the
last Q samples; each step their scores are recomputed with the *current* prototypes and stacked in front of
the batch's scores, so Sinkhorn balances over Q + B samples. Only the batch's codes are used in the loss.

The queue stores embeddings, not scores (scores from stale prototypes would be wrong); it is a ring buffer,
so Q need not be a multiple of B; it is used only once full and only after ``queue_start_step``; and its
whole state goes into every checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class FeatureQueue:
    """A ring buffer of (n_assign, Q, D) embeddings, one queue per assignment view.

    Args:
        n_assign: number of assignment views (``len(crops_for_assign)``).
        length: rows Q per assignment view.
        dim: embedding dimension D.
        start_step: first step at which a full queue is used.
    """

    def __init__(self, n_assign: int, length: int, dim: int, *, start_step: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if n_assign < 1 or length < 1 or dim < 1:
            raise ValueError("n_assign, length and dim must be >= 1")
        self.start_step = start_step
        self.rows = torch.zeros(n_assign, length, dim, device=device)  # (A, Q, D)
        self.ptr = 0  # next row to write
        self.filled = 0  # rows written so far, capped at Q

    @property
    def length(self) -> int:
        return self.rows.shape[1]

    @property
    def full(self) -> bool:
        return self.filled >= self.length

    @property
    def fill(self) -> float:
        """Fraction of rows holding real embeddings, 0..1."""
        return self.filled / self.length

    def active(self, step: int) -> bool:
        """Whether the queue takes part in Sinkhorn at ``step``."""
        return self.full and step >= self.start_step

    def embeddings(self, assign_idx: int) -> Tensor:
        """(Q, D) embeddings for one assignment view, oldest first (order does not matter to Sinkhorn)."""
        return self.rows[assign_idx]

    @torch.no_grad()
    def push(self, embeddings: Tensor) -> None:
        """Append one batch: ``embeddings`` (n_assign, B, D), detached. If B > Q only the newest Q stay."""
        if embeddings.dim() != 3 or embeddings.shape[0] != self.rows.shape[0] or \
                embeddings.shape[2] != self.rows.shape[2]:
            raise ValueError(f"expected ({self.rows.shape[0]}, B, {self.rows.shape[2]}), "
                             f"got {tuple(embeddings.shape)}")
        batch = embeddings.detach().to(self.rows.dtype)[:, -self.length:]  # keep the newest Q rows
        n = batch.shape[1]
        first = min(n, self.length - self.ptr)
        self.rows[:, self.ptr:self.ptr + first] = batch[:, :first]
        if first < n:  # wrap around to the start of the ring
            self.rows[:, : n - first] = batch[:, first:]
        self.ptr = (self.ptr + n) % self.length
        self.filled = min(self.length, self.filled + n)

    def ordered(self) -> Tensor:
        """(n_assign, filled, D): the rows written so far, oldest first."""
        if not self.full:
            return self.rows[:, :self.filled]
        return torch.cat([self.rows[:, self.ptr:], self.rows[:, :self.ptr]], dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows.clone(), "ptr": self.ptr, "filled": self.filled, "start_step": self.start_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows = state["rows"]
        if tuple(rows.shape) != tuple(self.rows.shape):
            raise ValueError(f"queue shape {tuple(rows.shape)} in state, {tuple(self.rows.shape)} configured")
        self.rows.copy_(rows)
        self.ptr = int(state["ptr"])
        self.filled = int(state["filled"])
        self.start_step = int(state["start_step"])


def reshard_queue(states: list[dict[str, Any]], rank: int, world: int, length: int) -> dict[str, Any]:
    """Rank ``rank`` of ``world``'s share (``length`` rows) of a job-wide queue saved as ``states`` by the
    ranks of another world size: every saved row, rank by rank, and this rank's every ``world``-th of them
    (the newest kept when they are more than ``length``)."""
    parts = []
    for state in states:
        queue = FeatureQueue(state["rows"].shape[0], state["rows"].shape[1], state["rows"].shape[2])
        queue.load_state_dict(state)
        parts.append(queue.ordered())
    mine = torch.cat(parts, dim=1)[:, rank::world][:, -length:]
    out = FeatureQueue(mine.shape[0], length, mine.shape[2], start_step=int(states[0]["start_step"]))
    if mine.shape[1]:
        out.push(mine)
    return out.state_dict()


__all__ = ["FeatureQueue", "reshard_queue"]
