"""The torchvision twin of the DALI multi-crop: the same MultiCropSpec, with PIL decoding and torchvision v2.

Used where DALI cannot be installed, and as the reference the DALI pipeline (dali.py) is checked against:
both draw crops, flips, jitter, grayscale, blur and solarisation with the same probabilities and ranges, in
the same order as SwAV (Caron et al. 2020) and SimCLR: RandomResizedCrop (antialiased) -> horizontal flip
-> ColorJitter with probability jitter_p -> RandomGrayscale -> GaussianBlur with probability blur_p ->
RandomSolarize -> float32 in [0, 1] -> Normalize. Known small differences from DALI, which the tests
bound: torchvision applies the four jitter operations in a random order and shifts hue in HSV, DALI applies
brightness/contrast then saturation/hue in a fixed order and shifts hue by a rotation about the gray axis
(both pivot contrast on the mean gray level and saturate to 0..255: torchvision after each step, DALI
after brightness/contrast and after saturation/hue, unrounded); the blur is the same (the spec's window); a
JPEG with corrupt entropy-coded data is decoded (with artefacts) by DALI but rejected by PIL.

Two ways to run it:

* ``TorchvisionMultiCrop(spec, batch_size)(batch) -> (views, kept)``: in-process, the same call as
  ``DaliMultiCrop``; simple, single-threaded per call.
* ``MultiCropDataset`` + ``collate_views`` in a ``torch.utils.data.DataLoader(num_workers=N)``: the way
  torchvision users parallelise it. Workers cannot call back into the parent, so bad samples come back as
  the ``dropped`` list of each batch and the parent counts them.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from streamssl.augment.spec import CropGroup, MultiCropSpec, encoded_bytes

OnBad = Callable[[str], None]


def decode_rgb(data: bytes) -> torch.Tensor | None:
    """Decode an image to a (3, H, W) uint8 RGB tensor with PIL; None when it cannot be decoded.

    ``convert("RGB")`` turns grayscale, palette, RGBA (alpha dropped) and CMYK images into RGB. PIL raises
    on truncated files (``LOAD_TRUNCATED_IMAGES`` is left off), so a JPEG cut short is rejected rather than
    half-decoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
        return v2.functional.pil_to_tensor(rgb)  # (3, H, W) uint8
    except Exception:  # UnidentifiedImageError, OSError (truncated/corrupt), DecompressionBombError, ...
        return None


def view_transform(spec: MultiCropSpec, group: CropGroup) -> v2.Compose:
    """The torchvision v2 transform of one view of ``group``: (3, H, W) uint8 -> (3, S, S) float32."""
    blur_k = spec.blur_kernel(group.size)
    steps: list[Any] = [
        v2.RandomResizedCrop(group.size, scale=(group.min_scale, group.max_scale), ratio=spec.aspect_ratio,
                             antialias=True),
        v2.RandomHorizontalFlip(p=spec.flip_p),
    ]
    if spec.jitter_p > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(brightness=spec.brightness, contrast=spec.contrast,
                                                    saturation=spec.saturation, hue=spec.hue)],
                                    p=spec.jitter_p))
    if spec.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(p=spec.grayscale_p))
    if spec.blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(blur_k, sigma=spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=spec.solarize_threshold, p=spec.solarize_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(spec.mean), std=list(spec.std))]
    return v2.Compose(steps)


class MultiCropTransform:
    """All V views of one decoded image: (3, H, W) uint8 -> V tensors (3, S_v, S_v), in spec order."""

    def __init__(self, spec: MultiCropSpec) -> None:
        self.spec = spec
        per_group = {group: view_transform(spec, group) for group in spec.groups}
        self.transforms = [per_group[group] for group in spec.view_groups]

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [transform(image) for transform in self.transforms]


class MultiCropDataset(torch.utils.data.Dataset):
    """Encoded images (bytes or Samples) as a map-style dataset of multi-crop views.

    ``dataset[i]`` is ``(i, views)`` with V tensors (3, S_v, S_v), or ``(i, None)`` when image i does not
    decode. Batch it with ``collate_views``.
    """

    def __init__(self, items: Sequence[Any], spec: MultiCropSpec) -> None:
        self.items = items
        self.transform = MultiCropTransform(spec)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, list[torch.Tensor] | None]:
        image = decode_rgb(encoded_bytes(self.items[i]))
        return i, None if image is None else self.transform(image)


def collate_views(items: Sequence[tuple[int, list[torch.Tensor] | None]]
                  ) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """Collate ``MultiCropDataset`` items: (V tensors (B', 3, S_v, S_v), kept indices, dropped indices).

    With every item dropped, the views are an empty list (the sizes are not known here).
    """
    good = [(i, views) for i, views in items if views is not None]
    dropped = [i for i, views in items if views is None]
    if not good:
        return [], [], dropped
    views = [torch.stack(column) for column in zip(*(v for _, v in good), strict=True)]  # V x (B', 3, S, S)
    return views, [i for i, _ in good], dropped


class TorchvisionMultiCrop:
    """SwAV multi-crop of a batch of encoded images with PIL + torchvision v2, in this process.

    Same call as ``DaliMultiCrop``: ``(batch) -> (views, kept)`` with V tensors (B', 3, S_v, S_v) float32
    and the indices of the B' inputs that decoded; each undecodable input is counted through
    ``on_bad("decode_error")``. ``seed`` seeds a private RNG stream, so the global torch RNG is left alone.
    ``device`` only says where the views are moved to; the work is on CPU.
    """

    def __init__(self, spec: MultiCropSpec, batch_size: int, *, device: str = "cpu", seed: int = 0,
                 on_bad: OnBad | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = spec
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.on_bad = on_bad
        self.transform = MultiCropTransform(spec)
        self._rng_state = torch.Generator().manual_seed(seed).get_state()

    def __call__(self, batch: Sequence[Any]) -> tuple[list[torch.Tensor], list[int]]:
        items = []
        # torchvision's transforms draw from the global torch RNG: run them on our own stream of it.
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            for i, item in enumerate(batch):
                image = decode_rgb(encoded_bytes(item))
                items.append((i, None if image is None else self.transform(image)))
            self._rng_state = torch.get_rng_state()
        views, kept, dropped = collate_views(items)
        for _ in dropped:
            if self.on_bad is not None:
                self.on_bad("decode_error")
        if not kept:
            views = [torch.empty((0, 3, s, s)) for s in self.spec.view_sizes]
        return [v.to(self.device) for v in views], kept


__all__ = ["MultiCropDataset", "MultiCropTransform", "TorchvisionMultiCrop", "collate_views", "decode_rgb",
           "view_transform"]
