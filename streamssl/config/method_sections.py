"""The sections of the methods other than SwAV (whose settings are in ``[learner]``): one per method, each
read only when ``learner.method`` names it."""

from __future__ import annotations

from dataclasses import dataclass

from streamssl.config.fields import setting as _f


@dataclass(frozen=True)
class SimCLRConfig:
    """SimCLR (learner/methods/simclr.py): NT-Xent over the views of a batch."""

    temperature: float = _f(0.2, "Softmax temperature of NT-Xent (the paper: 0.1 at batch 4096, 0.5 for small "
                            "batches; 0.2 between).", gt=0)


@dataclass(frozen=True)
class MoCoConfig:
    """MoCo v2 (learner/methods/moco.py): queries against a momentum encoder's keys and a queue of earlier keys."""

    temperature: float = _f(0.2, "InfoNCE temperature (MoCo v2: 0.2).", gt=0)
    queue_length: int = _f(4096, "Negative keys kept (MoCo: 65536 on ImageNet; the queue is a stream's recent "
                           "past, so shorter suits a changing stream).", ge=1)
    momentum: float = _f(0.99, "Key encoder EMA momentum (MoCo: 0.999 at batch 256 over long runs).", ge=0, le=1)
    bn_splits: int = _f(8, "Groups with their own batch-norm statistics when the key encoder sees the shuffled "
                        "keys (shuffling BN in one process).", ge=1)


@dataclass(frozen=True)
class DeepClusterConfig:
    """DeepCluster-v2 (learner/methods/deepcluster.py): k-means centroids on a memory of the recent stream; its
    temperature, number of centroids (model.n_prototypes) and assignment views are SwAV's settings."""

    memory_length: int = _f(32768, "Embeddings of the recent stream that k-means clusters (the paper: the whole "
                            "dataset, once per epoch): at least one per centroid (model.n_prototypes), better "
                            "10-30; two per image (the assignment views).", ge=2)
    refresh_steps: int = _f(200, "Re-cluster every this many steps once the memory is full.", ge=1)
    kmeans_iters: int = _f(10, "k-means rounds per refresh, from the current centroids.", ge=1)


@dataclass(frozen=True)
class NPIDConfig:
    """NPID (learner/methods/npid.py): instance discrimination against a bounded memory keyed by sample id."""

    temperature: float = _f(0.07, "Non-parametric softmax temperature (NPID: 0.07).", gt=0)
    memory_length: int = _f(16384, "Instances remembered (the oldest overwritten first).", ge=1)
    negatives: int = _f(4096, "Memory rows drawn as negatives per step (NPID's NCE: 4096).", ge=0)
    memory_momentum: float = _f(0.5, "Memory update v <- normalise(m v + (1 - m) f) (NPID: 0.5).", ge=0, le=1)
    proximal: float = _f(30.0, "Weight of the proximal term ||f - v||^2 for instances seen before (NPID: 30).",
                         ge=0)


@dataclass(frozen=True)
class BYOLConfig:
    """BYOL (learner/methods/byol.py): online network and predictor against an EMA target."""

    predictor_dim: int = _f(512, "Hidden width of the predictor MLP (the paper: 4096 for a 256-d projection).",
                            ge=1)
    momentum: float = _f(0.99, "Target EMA momentum at step 0 (the paper's tau_base: 0.996 at batch 4096; lower "
                         "suits small batches).", ge=0, le=0.99999)
    final_momentum: float = _f(0.999, "Momentum after momentum_steps: the paper ends at 1 with its training; an "
                               "unbounded stream keeps a target that still follows.", ge=0, le=1)
    momentum_steps: int = _f(10_000, "Steps of the cosine from momentum to final_momentum.", ge=1)


__all__ = ["BYOLConfig", "DeepClusterConfig", "MoCoConfig", "NPIDConfig", "SimCLRConfig"]
