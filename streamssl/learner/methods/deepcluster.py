"""DeepCluster-v2 (the SwAV paper's version: Caron et al. 2020, section 4 and appendix; after Caron et al. 2018).

The network (trunk, head, L2-normalised embedding) is trained to predict, from every view, the cluster of
another view of the same image, with cross-entropy over cosine scores against the centroids at temperature
``learner.temperature``. The centroids come from spherical k-means (``deepcluster.kmeans_iters`` rounds) on a
memory of embeddings. The paper re-clusters the whole dataset's embeddings once per epoch; a stream has no
dataset and no epochs, so here the memory is the recent stream (the assignment views' embeddings of the last
``deepcluster.memory_length`` rows, a FIFO) and k-means reruns every ``deepcluster.refresh_steps`` steps,
each time from ``K`` rows of the memory drawn at random, as the authors' code starts every epoch's k-means (so a
cluster that emptied comes back, and a clustering that drifted towards a few centroids is not continued).
With ranks (torch.distributed) every rank writes every rank's rows, so ``memory_length`` is the job's, and
k-means, run on every rank from the same seeded rows, gives the same centroids everywhere. The authors keep
each rank's rows on that rank and all-reduce k-means' sums: the same centroids; this way is simpler and
costs the job's memory on every rank (32768 x 128 floats by default, 16 MiB). The memory needs rows for
every centroid (the paper clusters about 400 images per centroid; here ``memory_length >= K`` is checked,
and ~10-30 per centroid is the practical range on a CPU).

The pseudo-labels. In the paper a sample's label is its cluster in the last k-means: fixed for a whole epoch,
so the network cannot move its own targets. On a stream an image is seen once and has no stored label, so
the label of an assignment view is the nearest centroid of the *labeller's* embedding of it: the labeller is
a frozen copy of trunk and head, snapshotted at every k-means refresh (the network whose recent embeddings
the centroids were computed from), run without gradient under the step's autocast. Between two refreshes
the labels are thus a fixed function of the input (and of the batch: the labeller's batch norm normalises by
the batch's statistics, as the forward whose embeddings k-means clustered did, and never writes its
buffers; its running statistics in eval mode would give an early snapshot, whose statistics have barely
left their initial values, a handful of clusters for every image: 4 of 512 against 95 at initialisation on
Fashion-MNIST). The first version took the label from the trained network's own embedding of the other view
*now*; the network could move its targets, and everything in one cluster solved the objective (1 of 512
clusters in use by step ~20-60 on Fashion-MNIST, ``fmnist-cpu``); with the labeller ~80 distinct labels per
batch of 256 held through the run, and at equal images the trunk scored 77.8% kNN against 65.1% (README.md).
Before the first refresh (the memory not yet full) the labeller is the initial network and the centroids
random unit vectors: fixed targets too, so no collapse can start before the first clustering (the old rule
collapsed before it).
The labeller is in the state dict (checkpoints, rollbacks), never in the optimizer (``requires_grad`` off),
and costs one forward pass of the assignment views without gradient (the ``labels`` part).

Centroids are buffers, not parameters (no gradient, no optimizer state); they are what the prototype store
publishes. Health: the entropy of the batch's label histogram and the clusters in use (as SwAV's codes);
recovery: the rollback, then k-means at once on the memory (and a new labeller).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.config import DeepClusterConfig, LearnerConfig, ModelConfig
from streamssl.distributed import gather
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
                            temperature: float, label_emb: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """Cross-entropy of every view's scores against the label (nearest centroid) of each assignment view but
    itself.

    ``emb``: (V*B, D) unit embeddings, view-major. ``label_emb``: the (A*B, D) embeddings the assignment views'
    labels are taken from, in ``assign_views`` order (the labeller's); None: those views of ``emb``. Returns
    the loss and the (B,) labels per assignment view.
    """
    batch = emb.shape[0] // n_views
    scores = emb.float() @ centroids.T / temperature  # (V*B, K)
    if label_emb is None:
        label_emb = torch.cat([emb[t * batch:(t + 1) * batch] for t in assign_views])
    labels = list((label_emb.detach().float() @ centroids.T).argmax(dim=1).split(batch))
    terms = [F.cross_entropy(scores[v * batch:(v + 1) * batch], label)
             for t, label in zip(assign_views, labels, strict=True) for v in range(n_views) if v != t]
    return torch.stack(terms).mean(), labels


class DeepClusterV2(Method):
    """Trunk and head; centroids and the memory of recent embeddings as buffers."""

    name = "deepcluster"
    parts = ("forward", "labels", "loss")
    diagnostics = SwAV.diagnostics[:2]  # code entropy and clusters in use
    health = "code_entropy"

    def __init__(self, model_cfg: ModelConfig, cfg: LearnerConfig, *, device: torch.device,
                 settings: DeepClusterConfig | None = None, **_: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.settings = settings or DeepClusterConfig()
        self.trunk, self.feature_dim, self.head, self.embed_dim = make_encoder(model_cfg)
        # The frozen network the labels come from: the initial one until the first refresh (no RNG drawn).
        self.labeller = nn.Sequential(copy.deepcopy(self.trunk), copy.deepcopy(self.head)).requires_grad_(False)
        for m in self.labeller.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False  # in train mode: the batch's statistics, buffers never written
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
        label_emb = self.label_embeddings([views[t] for t in assign])  # (A*B, D)
        mark("labels")
        with torch.autocast(emb.device.type, enabled=False):
            loss, labels = cluster_prediction_loss(emb, self.centroids, assign, n_views, self.cfg.temperature,
                                                   label_emb)
        mark("loss")
        batch = views[0].shape[0]
        # every rank's rows, view by view (the order of one process on the whole batch): the memory, and so
        # the centroids and labels, are the job's and the same on every rank
        self._emb = torch.cat([gather(emb[t * batch:(t + 1) * batch]) for t in assign]).detach().float()
        entropy, in_use = label_usage(torch.cat(labels))
        return loss, {"code_entropy": entropy, "prototypes_in_use": in_use}

    @torch.no_grad()
    def label_embeddings(self, views: Sequence[Tensor]) -> Tensor:
        """The labeller's (N*B, D) unit embeddings of ``views`` (N of them, (B, 3, H, W) each), view-major."""
        trunk, head = self.labeller
        return F.normalize(head(features_by_size(trunk, views)), dim=1)

    @torch.no_grad()
    def labels(self, views: Sequence[Tensor]) -> Tensor:
        """(N*B,) pseudo-labels of ``views``: the nearest centroid of the labeller's embedding of each."""
        return (self.label_embeddings(views).float() @ self.centroids.T).argmax(dim=1)

    def train(self, mode: bool = True) -> DeepClusterV2:
        """The labeller stays in train mode whatever ``mode``: its batch norm normalises by the batch's
        statistics, as the trained network's forward whose embeddings k-means clustered, and (not tracking)
        never writes its buffers. Its running statistics (those of its snapshot) would give an early network,
        whose statistics have barely moved from their initial values, one cluster for every image."""
        super().train(mode)
        self.labeller.train()
        return self

    def forward_buffers(self) -> list[Tensor]:
        """The trained network's batch-norm statistics (the labeller's are never written)."""
        return [b for part in (self.trunk, self.head) for m in part.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]

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
        self.snapshot_labeller()
        self.last_refresh.fill_(step)

    @torch.no_grad()
    def snapshot_labeller(self) -> None:
        """The labeller <- the trained trunk and head (weights and batch-norm statistics)."""
        trained = nn.Sequential(self.trunk, self.head).state_dict()
        for name, value in self.labeller.state_dict().items():
            value.copy_(trained[name])

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """A checkpoint from before the labeller (no ``labeller.*`` keys) gets the saved network as labeller."""
        if not any(k.startswith("labeller.") for k in state_dict):
            result = super().load_state_dict(state_dict, strict=False, assign=assign)
            if strict and (result.unexpected_keys or any(not k.startswith("labeller.") for k in result.missing_keys)):
                raise RuntimeError(f"state_dict does not fit DeepClusterV2: {result}")
            self.snapshot_labeller()
            return result
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

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
