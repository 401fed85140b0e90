"""The SwAV network: ResNet trunk -> projection head -> L2-normalised embedding -> prototypes.

Follows the SwAV authors' ``resnet50.py``: the trunk is a torchvision ResNet without its classifier; the head
is Linear-BN-ReLU-Linear (or one Linear, or nothing); prototypes are a bias-free Linear whose rows the learner
renormalises before every step, so scores are cosine similarities in [-1, 1]. The multi-resolution forward
sends views of equal size through the trunk together (one batch-norm batch per resolution), as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models import resnet

from streamssl.config import ModelConfig

TRUNK_DIMS = {"resnet10": 512, "resnet18": 512, "resnet34": 512, "resnet50": 2048}
# Trunks torchvision builds with its own ResNet class but has no builder function for: blocks per stage.
# ResNet-10 is ResNet-18 with one BasicBlock per stage instead of two: the same stages, widths and stem,
# 1.7-2x the images a second on 2 CPU cores (benchmarks/README.md, "A shallower trunk").
BASIC_BLOCK_LAYERS = {"resnet10": [1, 1, 1, 1]}


def stem_of(values: Mapping[str, Any]) -> dict[str, Any]:
    """make_trunk's stem arguments from a model config as a dict (a checkpoint's, an export's metadata); keys
    that an older checkpoint lacks get ModelConfig's defaults, which build the stem it was trained with."""
    defaults = ModelConfig()
    return {k: values.get(k, getattr(defaults, k)) for k in ("small_stem", "stem_stride", "stem_pool")}


def make_trunk(arch: str, *, small_stem: bool = False, stem_stride: int = 1, stem_pool: bool = False) -> nn.Module:
    """A randomly initialised torchvision ResNet with ``fc`` replaced by Identity: images -> (B, F) features.

    ``arch`` names a torchvision builder (resnet18/34/50) or a layout of ``BASIC_BLOCK_LAYERS`` (resnet10),
    which torchvision's ``ResNet`` class builds from its ``BasicBlock``.

    ``small_stem`` replaces the 7x7/2 conv by a 3x3 conv of stride ``stem_stride`` and drops the max-pool
    (1: the usual CIFAR/STL adaptation, keeping 32-96 px inputs from being shrunk 4x before the first block;
    2: half the resolution, about a third of the compute, for small images on slow machines). ``stem_pool``
    keeps torchvision's 3x3/2 max-pool after the small stem's conv: with stride 1, the same stage sizes and
    nearly the compute of stride 2, but the first conv sees every pixel and the pool keeps its strongest
    responses instead of every other one.
    """
    if arch not in TRUNK_DIMS:
        raise ValueError(f"unknown trunk {arch!r}; choose from {', '.join(TRUNK_DIMS)}")
    if stem_stride not in (1, 2) or (stem_stride != 1 and not small_stem):
        raise ValueError(f"stem_stride {stem_stride}: 1, or 2 with the small stem")
    if stem_pool and not small_stem:
        raise ValueError("stem_pool needs the small stem (the default stem has its max-pool already)")
    # zero_init_residual: each residual branch starts as identity, as in the SwAV and SimCLR recipes.
    if arch in BASIC_BLOCK_LAYERS:
        trunk = resnet.ResNet(resnet.BasicBlock, BASIC_BLOCK_LAYERS[arch], zero_init_residual=True)
    else:
        trunk = getattr(torchvision.models, arch)(weights=None, zero_init_residual=True)
    if small_stem:
        trunk.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        nn.init.kaiming_normal_(trunk.conv1.weight, mode="fan_out", nonlinearity="relu")
        if not stem_pool:
            trunk.maxpool = nn.Identity()
    trunk.fc = nn.Identity()
    return trunk


def make_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Projection head: Linear-BN-ReLU-Linear, a single Linear when hidden_dim == 0, Identity when out_dim == 0."""
    if out_dim == 0:
        return nn.Identity()
    if hidden_dim == 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class SwAVModel(nn.Module):
    """Trunk, head and prototypes.

    ``forward(views)`` takes a list of V view batches [(B, 3, H_v, W_v)] and returns
    ``(embeddings, scores)``: (V*B, D) L2-normalised embeddings and (V*B, K) prototype scores, view-major.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = make_trunk(cfg.arch, small_stem=cfg.small_stem, stem_stride=cfg.stem_stride,
                                stem_pool=cfg.stem_pool)
        self.feature_dim = TRUNK_DIMS[cfg.arch]
        self.head = make_head(self.feature_dim, cfg.hidden_dim, cfg.out_dim)
        self.embed_dim = cfg.out_dim or self.feature_dim
        self.prototypes = nn.Linear(self.embed_dim, cfg.n_prototypes, bias=False)
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise every prototype (row of the weight), in place."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))

    def features(self, views: Sequence[Tensor]) -> Tensor:
        """(V*B, F) trunk features; consecutive views of equal size share one trunk call."""
        out: list[Tensor] = []
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            batch = torch.cat(list(views[start:end])) if end - start > 1 else views[start]
            out.append(self.trunk(batch))
            start = end
        return torch.cat(out) if len(out) > 1 else out[0]

    def forward(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        feats = self.features(views)  # (V*B, F)
        emb = F.normalize(self.head(feats), dim=1)  # (V*B, D)
        return emb, self.prototypes(emb)  # (V*B, D), (V*B, K)
