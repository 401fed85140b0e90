"""The networks' parts every method builds from: a ResNet trunk and a projection head.

Follows the SwAV authors' ``resnet50.py``: the trunk is a torchvision ResNet without its classifier; the head
is Linear-BN-ReLU-Linear (or one Linear, or nothing). Each method (learner/methods/) puts them together with what it
needs beside them (SwAV's prototypes, a predictor, a momentum encoder).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torchvision
from torch import nn
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
