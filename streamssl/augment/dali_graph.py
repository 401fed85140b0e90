"""The DALI graph of SwAV multi-crop, built from a ``MultiCropSpec`` (dali.py builds and runs pipelines of it).

Graph (one per pipeline, built from the spec; ``if`` = a DALI conditional, the branch runs only for the
samples whose coin came up). Crops and flips are drawn by DALI; the colour and blur parameters are drawn
in numpy (``view_draws``, seeded like the pipeline) and fed per run as one scalar a sample::

    external_source (encoded bytes, batch mode: any batch of 1..batch_size)
      -> decoders.image                 (CPU: libjpeg-turbo & co; GPU: device="mixed", nvJPEG)
      -> per view:
         random_resized_crop            (area and aspect ranges of the view's group; linear, antialias=True)
         brightness_contrast            (brightness, contrast 0.8s, or 1 without the jitter coin; contrast
                                         pivots on the view's mean grey level; uint8, saturating)
         color_twist -> min/max         (saturation 0.8s, 0 when the grayscale coin came up; hue 0.2s of a
                                         turn = 72s degrees; float out, clamped to 0..255)
         crop_mirror_normalize          (flip coin, HWC -> CHW, (x/255 - mean) / std, float32)
         if blur: filter, filter        (planar float; Gaussian of sigma in blur_sigma over the spec's window,
                                         one 1D pass along rows, one along columns)
    Without jitter and grayscale the colour steps are left out. With solarize_p > 0 the last two steps
    become: blur, solarize (x >= t -> 255 - x) on the 0-255 scale, then crop_mirror_normalize.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamssl.augment.spec import CropGroup, MultiCropSpec

INPUT = "encoded"


def _coin(fn: Any, types: Any, p: float) -> Any:
    """A per-sample coin that is 1 with probability p: a DALI int32 node, or a plain 0/1 when p is 0 or 1
    (then the graph has no coin and conditionals on it are resolved when the graph is built)."""
    if p <= 0:
        return 0
    if p >= 1:
        return 1
    return fn.random.coin_flip(probability=p, dtype=types.INT32)


def define_graph(spec: MultiCropSpec, *, gpu: bool, fused_decode: bool) -> tuple[Any, ...]:
    """The multi-crop graph; called inside a DALI pipeline context. Returns V nodes of (B, 3, S, S)."""
    from nvidia.dali import fn, types

    encoded = fn.external_source(name=INPUT, dtype=types.UINT8, ndim=1)
    decoder_device = "mixed" if gpu else "cpu"
    decoded = None
    if not fused_decode:
        decoded = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)  # (H, W, 3) u8
    views = []
    for index, group in enumerate(spec.view_groups):
        view = _crop(fn, types, spec, group, encoded, decoded, decoder_device)
        views.append(_distort(fn, types, spec.for_group(group), index, view))
    return tuple(views)


def _crop(fn: Any, types: Any, spec: MultiCropSpec, group: CropGroup, encoded: Any, decoded: Any,
          decoder_device: str) -> Any:
    """One random resized crop of side group.size, antialiased linear resize. (S, S, 3) uint8."""
    area = [group.min_scale, group.max_scale]
    ratio = list(spec.aspect_ratio)
    if decoded is None:  # fused: decode only the crop's region
        view = fn.decoders.image_random_crop(encoded, device=decoder_device, output_type=types.RGB,
                                             random_area=area, random_aspect_ratio=ratio, num_attempts=10)
        return fn.resize(view, size=[group.size, group.size], antialias=True)
    return fn.random_resized_crop(decoded, size=[group.size, group.size], random_area=area,
                                  random_aspect_ratio=ratio, num_attempts=10, antialias=True)


def _draw(fn: Any, types: Any, index: int, name: str, dtype: Any, ndim: int = 0) -> Any:
    """The per-sample draw ``name`` of view ``index``, fed each run from ``view_draws``."""
    return fn.external_source(name=draw_name(index, name), dtype=dtype, ndim=ndim)


def draw_name(index: int, name: str) -> str:
    return f"view{index}_{name}"


def _distort(fn: Any, types: Any, spec: MultiCropSpec, index: int, view: Any) -> Any:
    """Colour jitter, grayscale, blur, solarisation, flip and normalisation of view ``index``, (S, S, 3) uint8.

    The colour and blur parameters are drawn in numpy (``view_draws``) and fed per run, so the graph holds
    no random or arithmetic operators for them: each operator costs ~0.1 ms of scheduling per batch,
    whatever its work. ``if`` on a DALI node is a DALI conditional (the pipeline enables them): the branch
    runs only for the samples whose predicate holds (the blur: half the views at SwAV's blur_p).
    """
    coloured = _has_colour(spec)
    if coloured:
        view = _colour(fn, types, index, view)  # (S, S, 3) float, 0-255
    normalise = {"dtype": types.FLOAT, "output_layout": "CHW", "mirror": _coin(fn, types, spec.flip_p),
                 "mean": [255.0 * m for m in spec.mean], "std": [255.0 * s for s in spec.std]}
    if spec.solarize_p == 0:
        # Normalise first, then blur the planar float view: a blur is a weighted mean (it commutes with the
        # per-channel affine normalisation and, being symmetric, with the flip), and the planar (CHW) float
        # blur measured cheaper than the interleaved (HWC) one.
        view = fn.crop_mirror_normalize(view, **normalise)  # (3, S, S) float32
        return _blur(fn, types, spec, index, view)
    if not coloured:
        view = fn.cast(view, dtype=types.FLOAT)
    view = _blur(fn, types, spec, index, view)  # (S, S, 3) float, 0-255
    if _coin(fn, types, spec.solarize_p):  # after the blur, on the 0-255 scale: normalise last
        threshold = float(spec.solarize_threshold)
        view = view + (view >= threshold) * (255.0 - 2.0 * view)  # x < t: x; x >= t: 255 - x
    return fn.crop_mirror_normalize(view, **normalise)  # (3, S, S) float32


def _has_colour(spec: MultiCropSpec) -> bool:
    return spec.jitter_p > 0 or spec.grayscale_p > 0


def _colour(fn: Any, types: Any, index: int, view: Any) -> Any:
    """Colour jitter then grayscale (brightness, contrast, saturation, hue of ``view_draws``) of a (S, S, 3)
    uint8 view: float 0-255 out. Every sample runs it (a sample without jitter draws the identity): cheaper
    on CPU than a conditional, whose branches would need one output type, and a uint8 result would need
    DALI's slow float -> uint8 conversion."""
    from nvidia.dali import math as dmath

    # Contrast pivots on the view's mean grey level, as in torchvision (color_twist's contrast would pivot
    # on mid-grey). uint8 in, uint8 out (a lookup table: cheap): saturates like torchvision.
    centre = fn.reductions.mean(fn.color_space_conversion(view, image_type=types.RGB, output_type=types.GRAY))
    if centre.device == "gpu":
        centre = centre.cpu()  # named arguments live on the CPU (a GPU->CPU copy of B floats)
    view = fn.brightness_contrast(view, brightness=_draw(fn, types, index, "brightness", types.FLOAT),
                                  contrast=_draw(fn, types, index, "contrast", types.FLOAT),
                                  contrast_center=centre)  # (S, S, 3) uint8
    # Saturation and hue (DALI's hue is in degrees); grayscale folded in as saturation 0: color_twist's hue
    # and saturation act on the chroma plane only, so the grey level after them is the one before them.
    view = fn.color_twist(view, saturation=_draw(fn, types, index, "saturation", types.FLOAT),
                          hue=_draw(fn, types, index, "hue", types.FLOAT), dtype=types.FLOAT)
    return dmath.max(dmath.min(view, 255.0), 0.0)  # saturates as torchvision; cheaper than DALI's clamp


def _blur(fn: Any, types: Any, spec: MultiCropSpec, index: int, view: Any) -> Any:
    """Gaussian blur of a float view (HWC or CHW), for the samples whose blur coin came up: two 1D passes
    of ``fn.filter`` (OpenCV's filter2D on CPU) with the per-sample kernels of ``view_draws``."""
    if spec.blur_p == 0:
        return view
    if _draw(fn, types, index, "blur", types.BOOL):  # a DALI conditional
        for name in ("blur_h", "blur_v"):  # (1, k): along rows, then (k, 1): along columns
            kernel = _draw(fn, types, index, name, types.FLOAT, ndim=2)
            view = fn.filter(view, kernel.gpu() if view.device == "gpu" else kernel)
    return view


def gaussian_kernels(sigma: np.ndarray, size: int) -> np.ndarray:
    """Normalised 1D Gaussian kernels of odd width ``size``, one per sigma: (n, size) float32. Like
    torchvision's GaussianBlur (a fixed window, the same weights)."""
    x = np.arange(size) - size // 2
    kernels = np.exp(-0.5 * (x[None, :] / np.asarray(sigma, dtype=np.float64)[:, None]) ** 2)
    return (kernels / kernels.sum(axis=1, keepdims=True)).astype(np.float32)


def view_draws(spec: MultiCropSpec, group: CropGroup, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """The colour and blur parameters of one view for ``n`` samples, drawn as torchvision draws them.

    Returns arrays of length n (float32 unless said): with colour (jitter_p or grayscale_p > 0),
    ``brightness``, ``contrast`` and ``saturation`` factors and ``hue`` in degrees: drawn from the spec's
    ranges where the jitter coin (probability jitter_p) came up, else the identity (1, 1, 1, 0); saturation
    0 where the grayscale coin (grayscale_p) came up. With blur (blur_p > 0), ``blur`` (bool: the coin)
    and the Gaussian kernel of a sigma drawn in blur_sigma, over the spec's window k for the view's size
    (``spec.blur_kernel``), as ``blur_h`` (n, 1, k) and ``blur_v`` (n, k, 1) (the identity kernel where
    the coin is down; those samples skip the blur). The probabilities are the view's group's
    (``spec.for_group``).
    """
    spec = spec.for_group(group)
    draws: dict[str, np.ndarray] = {}
    if _has_colour(spec):
        jitter = rng.random(n) < spec.jitter_p
        gray = rng.random(n) < spec.grayscale_p

        def factor(f: float) -> np.ndarray:
            return np.where(jitter, rng.uniform(*spec.factor_range(f), n), 1.0)

        draws["brightness"] = factor(spec.brightness)
        draws["contrast"] = factor(spec.contrast)
        draws["saturation"] = factor(spec.saturation) * ~gray
        draws["hue"] = np.where(jitter, rng.uniform(-spec.hue_degrees, spec.hue_degrees, n), 0.0)
    if spec.blur_p > 0:
        blur = rng.random(n) < spec.blur_p
        kernels = gaussian_kernels(rng.uniform(*spec.blur_sigma, n), spec.blur_kernel(group.size))
        kernels[~blur] = 0.0
        kernels[~blur, kernels.shape[1] // 2] = 1.0  # the identity
        draws["blur"] = blur
        draws["blur_h"] = kernels[:, None, :]
        draws["blur_v"] = kernels[:, :, None]
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in draws.items()}


__all__ = ["INPUT", "define_graph", "draw_name", "gaussian_kernels", "view_draws"]
