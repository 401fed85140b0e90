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

* ``TorchvisionMultiCrop(spec, batch_size)(batch) -> (views, kept)``: the same call as ``DaliMultiCrop``;
  in the calling thread, or spread over worker processes (``workers``) with pinned memory for a GPU.
* ``MultiCropDataset`` + ``collate_views`` in a ``torch.utils.data.DataLoader(num_workers=N)``: the way
  torchvision users parallelise it. Workers cannot call back into the parent, so bad samples come back as
  the ``dropped`` list of each batch and the parent counts them.
"""

from __future__ import annotations

import io
import math
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


class ViewTransform:
    """One view of ``group``: (3, H, W) uint8 -> (3, S, S) float32, the torchvision v2 operations in SwAV's
    order with their parameters drawn from a given ``torch.Generator``.

    torchvision's random transforms draw from the process-global RNG; the twin runs in the daemon's feeder
    thread beside training, so it draws from a generator of its own instead and the learner's RNG is never
    touched. The draws follow torchvision's (``RandomResizedCrop``'s ten tries and centre-crop fallback,
    ``ColorJitter``'s random order of its four factors, ``RandomApply``'s probabilities).
    """

    def __init__(self, spec: MultiCropSpec, group: CropGroup) -> None:
        self.spec = spec.for_group(group)  # the group's own probabilities where it has them
        self.group = group
        self.blur_k = spec.blur_kernel(group.size)
        self.log_ratio = (math.log(spec.aspect_ratio[0]), math.log(spec.aspect_ratio[1]))

    @staticmethod
    def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    def _crop(self, h: int, w: int, g: torch.Generator) -> tuple[int, int, int, int]:
        area, (lo, hi) = h * w, (self.group.min_scale, self.group.max_scale)
        for _ in range(10):
            target = area * self._uniform(g, lo, hi)
            ratio = math.exp(self._uniform(g, *self.log_ratio))
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (), generator=g))
                left = int(torch.randint(0, w - cw + 1, (), generator=g))
                return top, left, ch, cw
        in_ratio, (rmin, rmax) = w / h, self.spec.aspect_ratio  # fallback: the central crop
        if in_ratio < rmin:
            cw, ch = w, round(w / rmin)
        elif in_ratio > rmax:
            ch, cw = h, round(h * rmax)
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def __call__(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        spec, F, size = self.spec, v2.functional, self.group.size
        top, left, ch, cw = self._crop(image.shape[-2], image.shape[-1], g)
        x = F.resized_crop(image, top, left, ch, cw, [size, size], antialias=True)
        if float(torch.rand((), generator=g)) < spec.flip_p:
            x = F.horizontal_flip(x)
        if spec.jitter_p > 0 and float(torch.rand((), generator=g)) < spec.jitter_p:
            factors = {0: self._uniform(g, max(0.0, 1 - spec.brightness), 1 + spec.brightness),
                       1: self._uniform(g, max(0.0, 1 - spec.contrast), 1 + spec.contrast),
                       2: self._uniform(g, max(0.0, 1 - spec.saturation), 1 + spec.saturation),
                       3: self._uniform(g, -spec.hue, spec.hue)}
            ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
            for k in torch.randperm(4, generator=g).tolist():
                x = ops[k](x, factors[k])
        if spec.grayscale_p > 0 and float(torch.rand((), generator=g)) < spec.grayscale_p:
            x = F.rgb_to_grayscale(x, num_output_channels=3)
        if spec.blur_p > 0 and float(torch.rand((), generator=g)) < spec.blur_p:
            sigma = self._uniform(g, *spec.blur_sigma)
            x = F.gaussian_blur(x, [self.blur_k, self.blur_k], [sigma, sigma])
        if spec.solarize_p > 0 and float(torch.rand((), generator=g)) < spec.solarize_p:
            x = F.solarize(x, spec.solarize_threshold)
        x = F.to_dtype(x, torch.float32, scale=True)
        return F.normalize(x, mean=list(spec.mean), std=list(spec.std))


class MultiCropTransform:
    """All V views of one decoded image: (3, H, W) uint8 -> V tensors (3, S_v, S_v), in spec order.

    ``generator``: where the random parameters come from; None: torch's default generator (right in
    DataLoader worker processes, which torch seeds one by one; wrong in a thread beside training).
    """

    def __init__(self, spec: MultiCropSpec) -> None:
        self.spec = spec
        per_group = {group: ViewTransform(spec, group) for group in spec.groups}
        self.transforms = [per_group[group] for group in spec.view_groups]

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        g = generator if generator is not None else torch.default_generator
        return [transform(image, g) for transform in self.transforms]


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
    """SwAV multi-crop of a batch of encoded images with PIL + torchvision v2.

    Same call as ``DaliMultiCrop``: ``(batch) -> (views, kept)`` with V tensors (B', 3, S_v, S_v) float32
    and the indices of the B' inputs that decoded; each undecodable input is counted through
    ``on_bad("decode_error")``. ``seed`` seeds a generator of its own: the global torch RNG is never touched;
    it draws one seed per image, and the image's views come from a generator of that seed, so the views do
    not depend on where they are made.

    ``workers``: 0 decodes and augments in the calling thread; N > 0 in N worker processes (started once,
    with "spawn": the daemon has threads, which "fork" must not copy), each taking a slice of the batch, the
    views coming back through shared memory as a DataLoader's do. ``device``: where the views go; on CUDA
    they are gathered into pinned memory and copied without blocking, so the copy overlaps the next batch's
    work. ``close`` stops the workers.
    """

    def __init__(self, spec: MultiCropSpec, batch_size: int, *, device: str = "cpu", seed: int = 0,
                 on_bad: OnBad | None = None, workers: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.spec = spec
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.on_bad = on_bad
        self.transform = MultiCropTransform(spec)
        self.generator = torch.Generator().manual_seed(seed)  # its own: the global RNG is the learner's
        self.workers = workers
        self._pool: Any = None
        if workers:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(spec,))

    def __call__(self, batch: Sequence[Any]) -> tuple[list[torch.Tensor], list[int]]:
        seeds = torch.randint(0, 2**62, (len(batch),), generator=self.generator).tolist()
        jobs = [(encoded_bytes(item), seed) for item, seed in zip(batch, seeds, strict=True)]
        if self._pool is None:
            parts = [_views_of(jobs, self.transform)]
        else:
            step = -(-len(jobs) // self.workers)
            parts = list(self._pool.map(_views_in_worker, [jobs[i:i + step] for i in range(0, len(jobs), step)]))
        views: list[list[torch.Tensor]] = []
        kept: list[int] = []
        offset = 0
        for part_views, part_kept, n in parts:
            if part_kept:
                views.append(part_views)
                kept += [offset + i for i in part_kept]
            offset += n
        for _ in range(len(batch) - len(kept)):
            if self.on_bad is not None:
                self.on_bad("decode_error")
        if not kept:
            return [torch.empty((0, 3, s, s), device=self.device) for s in self.spec.view_sizes], kept
        return [self._gather([v[k] for v in views]) for k in range(len(self.spec.view_sizes))], kept

    def _gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """One view's slices as one tensor on ``device``: through pinned memory to a GPU."""
        if self.device.type != "cuda":
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        pinned = torch.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), pin_memory=True)
        torch.cat(parts, out=pinned)
        return pinned.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the worker processes (no-op without workers)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _views_of(jobs: Sequence[tuple[bytes, int]], transform: MultiCropTransform
              ) -> tuple[list[torch.Tensor], list[int], int]:
    """The views of ``(encoded image, seed)`` jobs: (V tensors (B', 3, S, S), kept indices, len(jobs))."""
    items = []
    for i, (data, seed) in enumerate(jobs):
        image = decode_rgb(data)
        views = None if image is None else transform(image, torch.Generator().manual_seed(seed))
        items.append((i, views))
    views, kept, _ = collate_views(items)
    return views, kept, len(jobs)


_worker_transform: MultiCropTransform | None = None  # set in each worker process by _start_worker


def _start_worker(spec: MultiCropSpec) -> None:
    global _worker_transform
    torch.set_num_threads(1)  # one core a worker: the workers are the parallelism
    _worker_transform = MultiCropTransform(spec)


def _views_in_worker(jobs: Sequence[tuple[bytes, int]]) -> tuple[list[torch.Tensor], list[int], int]:
    assert _worker_transform is not None, "worker not started"
    return _views_of(jobs, _worker_transform)


__all__ = ["MultiCropDataset", "MultiCropTransform", "TorchvisionMultiCrop", "ViewTransform", "collate_views",
           "decode_rgb"]
