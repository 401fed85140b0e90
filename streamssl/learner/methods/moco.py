"""MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning"; Chen et al.
2020, "Improved Baselines with Momentum Contrastive Learning").

A query encoder (trunk and MLP head) and a key encoder that is its exponential moving average (momentum
``moco.momentum``, no gradient). Each query is classified against its positive key (another view of the same
image, through the key encoder) and the ``moco.queue_length`` keys of earlier batches in a FIFO queue: InfoNCE
with temperature ``moco.temperature`` over cosine similarities. The queue is pushed after the update, so the
keys of the current batch are never among its negatives, and nothing is pushed after a skipped step. The loss
is symmetrised over the two global views (each view's queries against the other's keys) and, with
multi-crop, every view's queries meet each global view's keys but their own.

Shuffling BN: across GPUs, MoCo shuffles the keys between processes so that a query and its key never share
batch-norm statistics (which would let the model cheat). Where one process holds the batch, the equivalent
used here (as in the authors' single-GPU demos): the key encoder sees the keys in a random order, in
``moco.bn_splits`` groups with batch-norm statistics of their own, then the order is restored.

Several ranks: every rank pushes the keys of the whole job's batch (gathered), so the queues stay identical;
the shuffle stays per rank, and with ``dist.sync_bn`` the key encoder's groups are normalised over every
rank's group of the same index.

Health: the spread of the query embeddings across the batch; the negatives make collapse rare, and a recovery
is the rollback alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from streamssl.config import LearnerConfig, MoCoConfig, ModelConfig
from streamssl.distributed import gather
from streamssl.learner.methods.base import (
    EMBEDDING_STD,
    Mark,
    Method,
    ema_,
    embedding_std,
    features_by_size,
    make_encoder,
    ring_slots,
)


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE of queries (B, D) against their keys (B, D) and the queue's negatives (L, D), all unit rows."""
    positive = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    negative = q @ queue.T  # (B, L)
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCo(Method):
    """Query trunk and head; an EMA key trunk and head; a FIFO queue of keys (a buffer: saved and moved with
    the module)."""

    name = "moco"
    parts = ("forward", "keys", "loss")
    diagnostics = (EMBEDDING_STD,)
    health = "embedding_std"

    def __init__(self, model_cfg: ModelConfig, cfg: LearnerConfig, *, device: torch.device,
                 settings: MoCoConfig | None = None, **_: Any) -> None:
        super().__init__()
        self.settings = settings or MoCoConfig()
        self.trunk, self.feature_dim, self.head, self.embed_dim = make_encoder(model_cfg)
        self.key_trunk = copy.deepcopy(self.trunk).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        # Random unit keys to start with, as the authors do; replaced as batches come.
        self.register_buffer("queue", F.normalize(torch.randn(self.settings.queue_length, self.embed_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._keys: Tensor | None = None  # this batch's keys, pushed after the update
        # The BN shuffle draws from a generator of its own (saved with the method), never the global RNG.
        self._shuffle = torch.Generator().manual_seed(cfg.seed)

    def _online(self) -> list[Tensor]:
        return [*self.trunk.parameters(), *self.head.parameters()]

    def _momentum(self) -> list[Tensor]:
        return [*self.key_trunk.parameters(), *self.key_head.parameters()]

    @torch.no_grad()
    def _encode_keys(self, views: Sequence[Tensor]) -> Tensor:
        """Unit keys (2B, D) of the two global views, through the key encoder with shuffled BN groups."""
        batch = torch.cat(list(views))
        order = torch.randperm(batch.shape[0], generator=self._shuffle).to(batch.device)
        splits = max(1, min(self.settings.bn_splits, batch.shape[0] // 2))
        keys = torch.cat([self.key_head(self.key_trunk(chunk)) for chunk in batch[order].chunk(splits)])
        return F.normalize(keys.float(), dim=1)[torch.argsort(order)]

    def loss(self, views: Sequence[Tensor], mark: Mark, step: int,
             ids: Sequence[str] | None = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        n_views = len(views)
        if n_views < 2:
            raise ValueError(f"MoCo needs at least 2 views, got {n_views}")
        if views[0].shape[-2:] != views[1].shape[-2:]:
            raise ValueError("MoCo: the first two views (the keys) need the same size")
        batch = views[0].shape[0]
        z = self.head(features_by_size(self.trunk, views))  # (V*B, D)
        mark("forward")
        self.embeddings = z[:batch].detach()
        keys = self._encode_keys(views[:2])  # (2B, D)
        mark("keys")
        with torch.autocast(z.device.type, enabled=False):
            q = F.normalize(z.float(), dim=1)
            queue = self.queue.detach().clone()
            terms = [info_nce(q[v * batch:(v + 1) * batch], keys[t * batch:(t + 1) * batch], queue,
                              self.settings.temperature) for v in range(n_views) for t in (0, 1) if t != v]
            loss = torch.stack(terms).mean()
        mark("loss")
        self._keys = gather(keys)  # the queue takes every rank's keys, as in the authors' code (identical queues)
        return loss, {"embedding_std": embedding_std(z)}

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        ema_(self._momentum(), self._online(), self.settings.momentum)
        if self._keys is not None:
            self._push(self._keys)
        self._keys = None

    @torch.no_grad()
    def _push(self, keys: Tensor) -> None:
        """FIFO: the newest keys overwrite the oldest; more keys than the queue holds keep the newest."""
        keys = keys[-self.queue.shape[0]:]
        self.queue[ring_slots(self.queue_ptr, keys.shape[0], self.queue.shape[0])] = keys.to(self.queue.dtype)

    def extra_state(self) -> dict[str, Any]:
        return {"shuffle": self._shuffle.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "shuffle" in state:
            self._shuffle.set_state(state["shuffle"])



__all__ = ["MoCo", "info_nce"]
