"""NPID (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"), on a stream.

Every image is its own class. A memory bank holds one unit vector per instance; the embedding of a view is
classified against its instance's memory by a non-parametric softmax at temperature ``npid.temperature``
(the paper's equation 2), approximated, as the paper does with NCE, by sampling: the positive against
``npid.negatives`` memory rows drawn at random and the batch's other images. After the update the memory
moves towards the new embedding, ``v <- normalise(m v + (1 - m) f)`` (``npid.memory_momentum``), and the
proximal term of section 3.4, ``npid.proximal * ||f - v||^2``, keeps the embedding of an instance seen before
close to its memory.

The stream adaptation: there is no dataset index, so the bank is keyed by a stable sample id (``Sample.id``,
the shard URL and member key, hashed to 63 bits) and bounded: ``npid.memory_length`` instances, the oldest
overwritten first. An instance not in the bank (the common case on a stream that rarely repeats, unless a
replay buffer feeds it again) takes the other global view's embedding, without gradient, as its positive,
and enters the bank after the update. Views that come without ids (benchmarks) are all new instances.

Several ranks: the in-batch negatives are the whole job's batch, and every rank writes every rank's
instances into its bank (the same draws of negatives on identical banks), so the banks stay identical.

Diagnostics: the spread of the embeddings across the batch (the health signal; recovery: the rollback) and
the share of the batch already in the bank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from streamssl.config import LearnerConfig, ModelConfig, NPIDConfig
from streamssl.distributed import gather, rank_offset
from streamssl.learner.methods.base import (
    EMBEDDING_STD,
    Diagnostic,
    Mark,
    Method,
    embedding_std,
    features_by_size,
    make_encoder,
    ring_slots,
)

EMPTY = -1  # bank key of a slot never written
NO_ID = -2  # key of an image without an id: never matches


def id_key(sample_id: str) -> int:
    """A stable 63-bit key of a sample id (Python's hash differs between processes)."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "big") >> 1


class NPID(Method):
    """Trunk and head; the memory bank (vectors, keys, write pointer) as buffers."""

    name = "npid"
    parts = ("forward", "loss")
    diagnostics = (EMBEDDING_STD, Diagnostic("memory_hit", "streamssl_learner_memory_hit_ratio", "Share of the "
                   "batch's images already in the instance memory (0 on a stream that never repeats).",
                   "in memory", "{:4.0%}"))
    health = "embedding_std"

    def __init__(self, model_cfg: ModelConfig, cfg: LearnerConfig, *, device: torch.device,
                 settings: NPIDConfig | None = None, **_: Any) -> None:
        super().__init__()
        self.settings = settings or NPIDConfig()
        self.trunk, self.feature_dim, self.head, self.embed_dim = make_encoder(model_cfg)
        length = self.settings.memory_length
        self.register_buffer("bank", torch.zeros(length, self.embed_dim))
        self.register_buffer("bank_keys", torch.full((length,), EMPTY, dtype=torch.long))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))
        self._negatives = torch.Generator().manual_seed(cfg.seed)  # its own draws, saved with the method
        self._pending: tuple[Tensor, Tensor] | None = None  # (keys, embeddings) to write

    def _keys(self, ids: Sequence[str] | None, batch: int, device: torch.device) -> Tensor:
        if ids is None or len(ids) != batch:
            return torch.full((batch,), NO_ID, dtype=torch.long, device=device)
        return torch.tensor([id_key(i) for i in ids], dtype=torch.long, device=device)

    def loss(self, views: Sequence[Tensor], mark: Mark, step: int,
             ids: Sequence[str] | None = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        if len(views) < 2:
            raise ValueError(f"NPID needs at least 2 views, got {len(views)}")
        s, batch = self.settings, views[0].shape[0]
        z = self.head(features_by_size(self.trunk, views[:2]))  # the two global views: (2B, D)
        mark("forward")
        with torch.autocast(z.device.type, enabled=False):
            f = F.normalize(z.float(), dim=1)
            f0, f1 = f[:batch], f[batch:]
            self.embeddings = f0.detach()
            keys = self._keys(ids, batch, f.device)
            match = (keys[:, None] == self.bank_keys[None, :]) & (keys[:, None] >= 0)  # (B, M)
            seen = match.any(dim=1)  # (B,)
            slot = match.float().argmax(dim=1)  # the instance's slot where seen
            memory = self.bank[slot].detach()
            # the other images' views (of every rank's batch) are negatives; an image's own other view is not
            offset = rank_offset(batch)
            others = {0: gather(f1.detach()), 1: gather(f0.detach())}  # (B_all, D)
            own_pair = (torch.arange(batch, device=f.device)[:, None] + offset
                        == torch.arange(others[0].shape[0], device=f.device)[None, :])
            losses, proximal = [], []
            for i, (own, other) in enumerate(((f0, f1), (f1, f0))):
                positive = torch.where(seen[:, None], memory, other.detach())  # (B, D)
                negatives = self._negative_rows(f.device)  # (N, D), may be empty
                in_batch = (own @ others[i].T).masked_fill(own_pair, float("-inf"))  # (B, B_all)
                logits = torch.cat([(own * positive).sum(dim=1, keepdim=True), own @ negatives.T, in_batch],
                                   dim=1)  # (B, 1 + N + B)
                losses.append(F.cross_entropy(logits / s.temperature,
                                              torch.zeros(batch, dtype=torch.long, device=f.device)))
                proximal.append(((own - memory) ** 2).sum(dim=1)[seen].sum() / batch)
            loss = torch.stack(losses).mean() + s.proximal * torch.stack(proximal).mean()
        mark("loss")
        self._pending = (gather(keys), gather(F.normalize((f0 + f1).detach(), dim=1)))  # every rank's
        return loss, {"embedding_std": embedding_std(z), "memory_hit": seen.float().mean()}

    def _negative_rows(self, device: torch.device) -> Tensor:
        filled = int((self.bank_keys != EMPTY).sum())  # filled slots are a prefix until the bank wraps
        n = min(self.settings.negatives, filled)
        if n == 0:
            return self.bank[:0]
        index = torch.randint(0, filled, (n,), generator=self._negatives).to(device)
        return self.bank[index].detach()

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        if self._pending is None:
            return
        keys, f = self._pending
        self._pending = None
        # Found again here (the bank has not changed since the loss): with several ranks every rank writes the
        # whole job's batch in the same order, so the banks stay identical.
        match = (keys[:, None] == self.bank_keys[None, :]) & (keys[:, None] >= 0)
        seen = match.any(dim=1)
        slots = match.float().argmax(dim=1)
        if seen.any():  # v <- normalise(m v + (1 - m) f)
            m = self.settings.memory_momentum
            self.bank[slots[seen]] = F.normalize(m * self.bank[slots[seen]] + (1 - m) * f[seen], dim=1)
        new = (~seen).nonzero().flatten()[-self.bank.shape[0]:]
        if new.numel():  # FIFO: new instances overwrite the oldest slots
            index = ring_slots(self.bank_ptr, new.numel(), self.bank.shape[0])
            self.bank[index] = f[new]
            self.bank_keys[index] = keys[new]

    def extra_state(self) -> dict[str, Any]:
        return {"negatives": self._negatives.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "negatives" in state:
            self._negatives.set_state(state["negatives"])



__all__ = ["NPID", "id_key"]
