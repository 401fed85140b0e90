"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Every view goes through the trunk and an MLP projection head; the embeddings are L2-normalised and each is
pulled towards the other views of its image and pushed from every view of the other images of the batch by
NT-Xent (the normalised temperature-scaled cross-entropy, the paper's equation 1), with cosine similarity
and temperature ``simclr.temperature``. With two views this is the paper's loss over its 2N views; with more
(multi-crop), every other view of the same image is a positive and the loss averages over them, as the SwAV
paper's multi-crop SimCLR does. There is no queue and no memory: the negatives are the batch.

Health: the spread of the embeddings across the batch (``embedding_std``); negatives make collapse rare, and a
collapse recovery is the rollback to the last healthy snapshot alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from streamssl.config import LearnerConfig, ModelConfig, SimCLRConfig
from streamssl.distributed import gather_with_grad, initialized, rank_offset
from streamssl.learner.methods.base import EMBEDDING_STD, Mark, Method, embedding_std, features_by_size, make_encoder


def nt_xent(z: Tensor, n_views: int, temperature: float, z_all: Tensor | None = None, offset: int = 0) -> Tensor:
    """NT-Xent of (V*B, D) embeddings, view-major (row v*B + i is view v of image i).

    For each anchor, ``-mean over its positives of log softmax(sim / T)`` over every other row (never itself);
    the mean over all V*B anchors. V = 2 is the paper's loss exactly. Several ranks: ``z_all`` is every rank's
    ``z`` (a gather, in rank order, each block view-major) and ``offset`` where this rank's rows start in it:
    the anchors are this rank's rows, the other rows come from the whole job's batch, as in the paper's
    multi-core training.
    """
    n = z.shape[0]
    batch = n // n_views
    z = F.normalize(z.float(), dim=1)
    keys = z if z_all is None else F.normalize(z_all.float(), dim=1)
    sim = (z @ keys.T) / temperature  # (VB, M)
    rows = torch.arange(n, device=z.device) + offset
    cols = torch.arange(keys.shape[0], device=z.device)
    itself = rows[:, None] == cols[None, :]
    sim = sim.masked_fill(itself, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)

    def image(i: Tensor) -> Tensor:  # the image a row shows: its rank's block, then its index in the batch
        return (i // n) * batch + (i % n) % batch

    positive = (image(rows)[:, None] == image(cols)[None, :]) & ~itself
    return -(log_prob.masked_fill(~positive, 0.0).sum(dim=1) / (n_views - 1)).mean()


class SimCLR(Method):
    """Trunk and projection head; ``loss`` is NT-Xent over the batch's views."""

    name = "simclr"
    parts = ("forward", "loss")
    diagnostics = (EMBEDDING_STD,)
    health = "embedding_std"

    def __init__(self, model_cfg: ModelConfig, cfg: LearnerConfig, *, device: torch.device,
                 settings: SimCLRConfig | None = None, **_: Any) -> None:
        super().__init__()
        self.settings = settings or SimCLRConfig()
        self.trunk, self.feature_dim, self.head, self.embed_dim = make_encoder(model_cfg)

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        return self.head(features_by_size(self.trunk, views))  # (V*B, D), not normalised

    def loss(self, views: Sequence[Tensor], mark: Mark, step: int,
             ids: Sequence[str] | None = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        if len(views) < 2:
            raise ValueError(f"SimCLR needs at least 2 views, got {len(views)}")
        z = self(views)
        mark("forward")
        self.embeddings = z[:views[0].shape[0]].detach()
        with torch.autocast(z.device.type, enabled=False):
            z_all = gather_with_grad(z) if initialized() else None  # negatives from every rank
            loss = nt_xent(z, len(views), self.settings.temperature, z_all, rank_offset(z.shape[0]))
        mark("loss")
        return loss, {"embedding_std": embedding_std(z)}



__all__ = ["SimCLR", "nt_xent"]
