"""MultiCropSpec: what the SwAV multi-crop views are, as pure data shared by every augmentation backend.

SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments")
draws, per image, a few large "global" views and several small "local" ones (multi-crop), each a random
resized crop followed by the SimCLR colour distortions: horizontal flip, colour jitter (brightness,
contrast, saturation 0.8*s, hue 0.2*s) applied with probability ``jitter_p``, grayscale with probability
``grayscale_p``, Gaussian blur with probability ``blur_p``, then normalisation. The DALI pipeline
(dali.py) and its torchvision twin (reference.py) both read this one spec, so that they draw views from the
same distributions; this module knows nothing of either library.

Asymmetric views: a crop group may carry its own jitter, grayscale, blur and solarisation probabilities
(``CropGroup.blur_p`` and so on; None: the spec's). BYOL (Grill et al. 2020) draws its two views from two
such distributions, blur always on the first and on 10% of the second, solarisation only on the second:
two groups of one view each, ``spec.for_group(group)`` being the recipe of a view of that group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from streamssl.config import AugmentConfig
from streamssl.config.sections import PER_GROUP_P as PER_GROUP  # probabilities a crop group may set itself


@dataclass(frozen=True)
class CropGroup:
    """Views of one size: ``n_views`` random resized crops of side ``size`` covering a random fraction in
    [min_scale, max_scale] of the image area."""

    n_views: int
    size: int
    min_scale: float
    max_scale: float
    jitter_p: float | None = None  # None: the spec's probability; a number: this group's own
    grayscale_p: float | None = None
    blur_p: float | None = None
    solarize_p: float | None = None

    def __post_init__(self) -> None:
        for name in PER_GROUP:
            p = getattr(self, name)
            if p is not None and not 0 <= p <= 1:
                raise ValueError(f"CropGroup.{name}: a probability in [0, 1] or None, got {p}")
        if self.n_views < 1 or self.size < 1:
            raise ValueError(f"CropGroup: n_views and size must be >= 1, got {self.n_views}, {self.size}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ValueError(f"CropGroup: need 0 < min_scale <= max_scale <= 1, got "
                             f"({self.min_scale}, {self.max_scale})")


@dataclass(frozen=True)
class MultiCropSpec:
    """The multi-crop recipe. Defaults are SwAV's 2x224 + 6x96 ImageNet recipe.

    View order is group by group: all views of ``groups[0]`` first, then those of ``groups[1]``, and so on;
    ``view_sizes`` lists the side of each view in that order, and every backend returns its views in it.
    """

    groups: tuple[CropGroup, ...] = (CropGroup(2, 224, 0.14, 1.0), CropGroup(6, 96, 0.05, 0.14))
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width/height range, as RandomResizedCrop
    flip_p: float = 0.5
    jitter_strength: float = 1.0  # s: brightness/contrast/saturation 0.8*s, hue 0.2*s (of a full turn)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: int = 128  # on the 0-255 scale: pixels >= threshold are inverted
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # on the 0-1 scale
    std: tuple[float, float, float] = (0.228, 0.224, 0.225)

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("MultiCropSpec: needs at least one crop group")
        for p_name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, p_name)
            if not 0 <= p <= 1:
                raise ValueError(f"MultiCropSpec.{p_name}: a probability in [0, 1], got {p}")
        if self.jitter_strength < 0:
            raise ValueError(f"MultiCropSpec.jitter_strength: must be >= 0, got {self.jitter_strength}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"MultiCropSpec.blur_sigma: need 0 < min <= max, got {self.blur_sigma}")
        if not 0 < self.aspect_ratio[0] <= self.aspect_ratio[1]:
            raise ValueError(f"MultiCropSpec.aspect_ratio: need 0 < min <= max, got {self.aspect_ratio}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("MultiCropSpec.mean/std: 3 entries each, std > 0")
        if not 0 <= self.solarize_threshold <= 256:
            raise ValueError(f"MultiCropSpec.solarize_threshold: in [0, 256], got {self.solarize_threshold}")

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> MultiCropSpec:
        """The spec an ``AugmentConfig`` describes (backend, threads, prefetch and seed are run settings and
        stay in the config)."""
        n_groups = len(cfg.sizes)
        # a probability is one value for every group, or one per group (then each group carries its own)
        shared = {name: getattr(cfg, name)[0] for name in PER_GROUP}
        own = [{name: getattr(cfg, name)[i] for name in PER_GROUP if len(getattr(cfg, name)) == n_groups > 1}
               for i in range(n_groups)]
        groups = tuple(CropGroup(n, s, lo, hi, **own[i]) for i, (n, s, lo, hi) in
                       enumerate(zip(cfg.n_views, cfg.sizes, cfg.min_scale, cfg.max_scale, strict=True)))
        return cls(groups=groups, flip_p=cfg.flip_p, jitter_strength=cfg.jitter_strength, **shared,
                   blur_sigma=(float(cfg.blur_sigma[0]), float(cfg.blur_sigma[1])),
                   mean=tuple(cfg.mean), std=tuple(cfg.std))  # type: ignore[arg-type]

    def for_group(self, group: CropGroup) -> MultiCropSpec:
        """The recipe of a view of ``group``: the spec with the group's own probabilities where it has them.
        Every backend draws a view's colour, blur and solarisation from this, not from the spec itself."""
        own = {name: getattr(group, name) for name in PER_GROUP if getattr(group, name) is not None}
        return replace(self, **own) if own else self

    @property
    def n_views(self) -> int:
        """V, the number of views per image."""
        return sum(g.n_views for g in self.groups)

    @property
    def view_sizes(self) -> tuple[int, ...]:
        """Side of each view, in output order (all views of group 0 first)."""
        return tuple(g.size for g in self.groups for _ in range(g.n_views))

    @property
    def view_groups(self) -> tuple[CropGroup, ...]:
        """The crop group of each view, in output order."""
        return tuple(g for g in self.groups for _ in range(g.n_views))

    # Colour jitter factors as SimCLR/SwAV define them from the strength s. Brightness, contrast and
    # saturation factors are drawn uniformly from [max(0, 1 - f), 1 + f].
    @property
    def brightness(self) -> float:
        return 0.8 * self.jitter_strength

    @property
    def contrast(self) -> float:
        return 0.8 * self.jitter_strength

    @property
    def saturation(self) -> float:
        return 0.8 * self.jitter_strength

    @property
    def hue(self) -> float:
        """Hue shift bound as a fraction of a full turn (torchvision's unit), capped at 0.5: a shift of half
        a turn either way already reaches every hue."""
        return min(0.2 * self.jitter_strength, 0.5)

    @property
    def hue_degrees(self) -> float:
        """The same bound in degrees (DALI's unit)."""
        return 360.0 * self.hue

    def factor_range(self, f: float) -> tuple[float, float]:
        """The multiplicative jitter range [max(0, 1 - f), 1 + f] of a jitter factor f."""
        return (max(0.0, 1.0 - f), 1.0 + f)

    def blur_kernel(self, size: int) -> int:
        """Odd Gaussian window (pixels) for views of side ``size``: SimCLR's 10% of the side, but no wider
        than 3 sigma_max either way (the Gaussian is ~0 beyond) and at least 3. torchvision blurs with this
        fixed window, and so does DALI."""
        tenth = int(0.1 * size) // 2 * 2 + 1
        three_sigma = 2 * math.ceil(3 * self.blur_sigma[1]) + 1
        return max(3, min(tenth, three_sigma))

    def solarize_lut(self) -> list[int]:
        """Solarisation as a 256-entry lookup table on uint8 values."""
        return [v if v < self.solarize_threshold else 255 - v for v in range(256)]

    def without_augmentation(self) -> MultiCropSpec:
        """The same crops with every colour/flip/blur augmentation off (for tests and debugging)."""
        groups = tuple(replace(g, **dict.fromkeys(PER_GROUP)) for g in self.groups)
        return replace(self, groups=groups, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def encoded_bytes(item: Any) -> bytes:
    """The encoded image of ``item``: a ``Sample`` (its ``.data``) or plain bytes."""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    return item.data


__all__ = ["PER_GROUP", "CropGroup", "MultiCropSpec", "encoded_bytes"]
