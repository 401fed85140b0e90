"""DeepCluster-v2 (the SwAV paper's version: Caron et al. 2020, section 4 and appendix; after Caron et al. 2018).

The network (trunk, head, L2-normalised embedding) is trained to predict, from every view, the cluster of
another view of the same image, with cross-entropy over cosine scores against the centroids at temperature
``learner.temperature``. The centroids come from spherical k-means (``deepcluster.kmeans_iters`` rounds) on a
memory of embeddings. The paper re-clusters the whole dataset's embeddings once per epoch; a stream has no
dataset and no epochs, so here the memory is the recent stream (the assignment views' embeddings of the last
``deepcluster.memory_length`` rows, a FIFO) and k-means reruns every ``deepcluster.refresh_steps`` steps,
each time from ``K`` rows of the memory drawn at random, as the authors' code starts every epoch's k-means (so a
cluster that emptied comes back, and a clustering that drifted towards a few centroids is not continued).
The cluster of a view is its nearest centroid (the paper's pseudo-label of the sample from the last
clustering; on a stream an image is seen once, so it is taken from the view's embedding now). Until the
memory first fills, the centroids are random unit vectors. The memory needs rows for every centroid (the
paper clusters about 400 images per centroid; here ``memory_length >= K`` is checked, and ~10-30 per centroid
is the practical range on a CPU).

Centroids are buffers, not parameters (no gradient, no optimizer state); they are what the prototype store
publishes. Health: the entropy of the batch's cluster histogram and the clusters in use (as SwAV's codes);
recovery: the rollback, then k-means at once on the memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from streamssl.config import DeepClusterConfig, LearnerConfig, ModelConfig
from streamssl.learner.methods.base import Mark, Method, features_by_size, make_encoder, ring_slots
from streamssl.learner.methods.swav import SwAV, label_usage, max_code_entropy


@torch.no_grad()
def spherical_kmeans(x: Tensor, centroids: Tensor, iters: int) -> Tensor:
    """``iters`` rounds of k-means on unit rows ``x`` (N, D) by cosine similarity, from ``centroids`` (K, D);
    returns unit centroids. A cluster left empty keeps its previous centroid."""
    c = F.normalize(centroids.float(), dim=1)
    x = x.float()
    for _ in range(iters):
        assign = (x @ c.T).argmax(dim=1)  # (N,)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=c.shape[0])
        c = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), c)
    return c


def cluster_prediction_loss(emb: Tensor, centroids: Tensor, assign_views: Sequence[int], n_views: int,
                            temperature: float) -> tuple[Tensor, list[Tensor]]:
    """Cross-entropy of every view's scores against the nearest centroid of each assignment view but itself.

    ``emb``: (V*B, D) unit embeddings, view-major. Returns the loss and the (B,) labels per assignment view.
    """
    batch = emb.shape[0] // n_views
    scores = emb.float() @ centroids.T / temperature  # (V*B, K)
    labels = [(emb[t * batch:(t + 1) * batch].detach().float() @ centroids.T).argmax(dim=1) for t in assign_views]
    terms = [F.cross_entropy(scores[v * batch:(v + 1) * batch], label)
             for t, label in zip(assign_views, labels, strict=True) for v in range(n_views) if v != t]
    return torch.stack(terms).mean(), labels


class DeepClusterV2(Method):
    """Trunk and head; centroids and the memory of recent embeddings as buffers."""

    name = "deepcluster"
    parts = ("forward", "loss")
    diagnostics = SwAV.diagnostics[:2]  # code entropy and clusters in use
    health = "code_entropy"

    def __init__(self, model_cfg: ModelConfig, cfg: LearnerConfig, *, device: torch.device,
                 settings: DeepClusterConfig | None = None, **_: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.settings = settings or DeepClusterConfig()
        self.trunk, self.feature_dim, self.head, self.embed_dim = make_encoder(model_cfg)
        k = model_cfg.n_prototypes
        self.register_buffer("centroids", F.normalize(torch.randn(k, self.embed_dim), dim=1))
        self.register_buffer("memory", torch.zeros(self.settings.memory_length, self.embed_dim))
        self.register_buffer("memory_fill", torch.zeros((), dtype=torch.long))  # rows written, capped at length
        self.register_buffer("memory_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_refresh", torch.full((), -1, dtype=torch.long))  # step of the last k-means
        self._seeds = torch.Generator().manual_seed(cfg.seed)  # k-means' starting rows, saved with the method
        self._emb: Tensor | None = None

    def loss(self, views: Sequence[Tensor], mark: Mark, step: int,
             ids: Sequence[str] | None = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        n_views = len(views)
        assign = [t for t in self.cfg.crops_for_assign if t < n_views]
        if n_views < 2 or not assign:
            raise ValueError(f"{n_views} views given; DeepCluster needs 2 and crops_for_assign among them")
        emb = F.normalize(self.head(features_by_size(self.trunk, views)), dim=1)  # (V*B, D)
        mark("forward")
        self.embeddings = emb[:views[0].shape[0]].detach()
        with torch.autocast(emb.device.type, enabled=False):
            loss, labels = cluster_prediction_loss(emb, self.centroids, assign, n_views, self.cfg.temperature)
        mark("loss")
        batch = views[0].shape[0]
        self._emb = torch.cat([emb[t * batch:(t + 1) * batch] for t in assign]).detach().float()
        entropy, in_use = label_usage(torch.cat(labels))
        return loss, {"code_entropy": entropy, "prototypes_in_use": in_use}

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        if self._emb is not None:
            self._remember(self._emb)
            self._emb = None
        full = int(self.memory_fill) >= self.memory.shape[0]
        due = int(self.last_refresh) < 0 or step - int(self.last_refresh) >= self.settings.refresh_steps
        if full and due:
            self.refresh(step)

    @torch.no_grad()
    def _remember(self, emb: Tensor) -> None:
        length = self.memory.shape[0]
        emb = emb[-length:]
        self.memory[ring_slots(self.memory_ptr, emb.shape[0], length)] = emb
        self.memory_fill.copy_(torch.clamp(self.memory_fill + emb.shape[0], max=length))

    @torch.no_grad()
    def refresh(self, step: int) -> None:
        """k-means on the memory, from K of its rows drawn at random."""
        k = self.centroids.shape[0]
        start = self.memory[torch.randperm(self.memory.shape[0], generator=self._seeds)[:k].to(self.memory.device)]
        self.centroids.copy_(spherical_kmeans(self.memory, start, self.settings.kmeans_iters))
        self.last_refresh.fill_(step)

    def extra_state(self) -> dict[str, Any]:
        return {"kmeans_seeds": self._seeds.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "kmeans_seeds" in state:
            self._seeds.set_state(state["kmeans_seeds"])

    def published(self) -> Tensor:
        return self.centroids

    def health_max(self, batch_size: int) -> float:
        return max_code_entropy(batch_size, len(self.cfg.crops_for_assign), self.centroids.shape[0])

    def start_recovery(self, step: int, recovery_steps: int, epsilon_factor: float) -> str:
        if int(self.memory_fill) >= self.memory.shape[0]:
            self.refresh(step)
            return "centroids re-clustered from the memory"
        return "rolled back (the memory is not full yet: centroids kept)"


__all__ = ["DeepClusterV2", "cluster_prediction_loss", "spherical_kmeans"]
