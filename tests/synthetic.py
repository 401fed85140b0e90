"""Generated view batches with a known cluster structure: for tests, benchmarks and smoke runs.

Each image belongs to one of ``n_clusters`` visually distinct families (an oriented colour grating: the
family fixes hue, orientation and frequency; each image draws its own phase, contrast and noise). Views are
random resized crops, flips and brightness jitter of it, made directly as tensors, so the learner can be
exercised without any decoding. Not a data source for real training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def clustered_images(n_images: int, n_clusters: int, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(N, 3, size, size) images in [0, 1] and their (N,) cluster labels."""
    labels = torch.randint(n_clusters, (n_images,), generator=generator)
    family = torch.Generator().manual_seed(1234)  # the families are fixed, whatever the caller's seed
    colours = torch.rand(n_clusters, 3, generator=family) * 0.8 + 0.1  # (C, 3)
    angles = torch.arange(n_clusters) * math.pi / n_clusters  # distinct orientations
    freqs = 2 + torch.rand(n_clusters, generator=family) * 4  # cycles per image
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    phase = torch.rand(n_images, generator=generator) * 2 * math.pi
    a, f = angles[labels].view(-1, 1, 1), freqs[labels].view(-1, 1, 1)
    wave = torch.sin(2 * math.pi * f * (xs * torch.cos(a) + ys * torch.sin(a)) + phase.view(-1, 1, 1))  # (N, S, S)
    contrast = 0.3 + 0.2 * torch.rand(n_images, 1, 1, 1, generator=generator)
    images = colours[labels].view(-1, 3, 1, 1) + contrast * wave.unsqueeze(1)  # (N, 3, S, S)
    images = images + 0.05 * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1), labels


def make_views(images: Tensor, sizes: Sequence[int], n_views: Sequence[int], generator: torch.Generator,
               scales: Sequence[tuple[float, float]] | None = None) -> list[Tensor]:
    """Multi-crop views of a batch: for each size group, ``n_views`` random resized crops with flips and
    brightness jitter, normalised to zero mean and unit spread. Returns [V x (B, 3, S_v, S_v)]."""
    scales = scales or [(0.3, 1.0) if i == 0 else (0.1, 0.4) for i in range(len(sizes))]
    batch, _, height, width = images.shape
    views = []
    for size, count, (lo, hi) in zip(sizes, n_views, scales, strict=True):
        for _ in range(count):
            crops = []
            for img in images:
                area = float(torch.empty(1).uniform_(lo, hi, generator=generator))
                side = max(2, round(math.sqrt(area) * min(height, width)))
                top = int(torch.randint(height - side + 1, (1,), generator=generator))
                left = int(torch.randint(width - side + 1, (1,), generator=generator))
                crops.append(F.interpolate(img[None, :, top:top + side, left:left + side], size=(size, size),
                                           mode="bilinear", align_corners=False, antialias=True))
            view = torch.cat(crops)  # (B, 3, S, S)
            flip = torch.rand(batch, generator=generator) < 0.5
            view[flip] = view[flip].flip(-1)
            view = view * (0.8 + 0.4 * torch.rand(batch, 1, 1, 1, generator=generator))
            views.append((view - 0.5) / 0.25)
    return views


def view_stream(batch_size: int, sizes: Sequence[int], n_views: Sequence[int], *, n_clusters: int = 8,
                image_size: int | None = None, seed: int = 0) -> Iterator[list[Tensor]]:
    """An endless stream of view batches of generated clustered images."""
    generator = torch.Generator().manual_seed(seed)
    image_size = image_size or max(sizes) * 2
    while True:
        images, _ = clustered_images(batch_size, n_clusters, image_size, generator)
        yield make_views(images, sizes, n_views, generator)


class ListStream:
    """Just enough of a SampleStream for the feeder: a list of samples, then the end."""

    def __init__(self, samples: Sequence) -> None:
        self.samples = list(samples)
        self.closed = False

    def __iter__(self) -> Iterator:
        return iter(self.samples)

    def state_dict(self) -> dict:
        return {}

    def close(self) -> None:
        self.closed = True
