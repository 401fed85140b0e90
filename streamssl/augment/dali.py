"""SwAV multi-crop on NVIDIA DALI: encoded image bytes in, V batches of normalised float32 NCHW views out.

The only module of streamssl that imports ``nvidia.dali``, and only inside functions, so that importing it
never fails where DALI is not installed. Implements the multi-crop of SwAV (Caron et al. 2020) as described
by a ``MultiCropSpec``; reference.py is its torchvision twin (same draws, same order of steps).

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

Decisions, measured with process CPU time (the machine was shared, wall clock was noisy) on 2 cores,
2x224 + 6x96 views, batch 64, 400x300 px JPEGs, SwAV defaults; CPU ms per batch of 64:

* All in, the default recipe costs ~420-440 ms (6.6-6.9 ms an image: decode ~30, the 8 antialiased crops
  ~180, normalisation ~10, colour ~140, blur ~50); the torchvision twin ~1400 ms (~22 ms an image through
  its DataLoader): ~3.3x less CPU. Wall clock with the 2 cores otherwise idle (2026-11, AVX-512 EPYC):
  ~269-281 img/s with 2 threads (3 threads: ~262-276), against ~94-98 img/s for the twin in a DataLoader
  with 2 workers: 2.7-2.9x. Many of DALI's CPU kernels are scalar where torch's are vectorised: its
  antialiased resize costs ~0.9 ms a 224 px view against ~0.25-0.4 ms for torchvision's, its float ->
  uint8 conversions ~7 ns a value; the gain is in colour and blur, and in one process with no per-image
  Python.
* Decode once, then ``random_resized_crop`` per view: ~560 ms, against ~660-735 ms for the fused
  ``decoders.image_random_crop`` per view (8 ROI decodes of every image). The fused path stays available
  (``fused_decode=True``) for images much larger than the views, where decoding only the ROI wins.
* Blur: two 1D passes of ``fn.filter`` (OpenCV's vectorised filter2D on CPU, DALI PR 4764) with
  Gaussian kernels made in numpy: ~16 ms a batch of 224 px planar float views with the 13-tap window,
  against ~84 ms for ``gaussian_blur`` (a scalar separable convolution; ~46 ms even with 5 taps; uint8
  HWC ~128 ms). The filter's cost is mostly passes over memory (3 taps ~9 ms, 23 taps ~23 ms), so every
  sample of a view uses the spec's fixed window, as torchvision does: the two blurs agree to 1e-4. Under
  a conditional (only the samples whose coin came up): ~6.5 ms an image all in, against ~7 with the
  identity kernel for the others; the whole recipe went from ~7.6 to ~6.6 ms an image. The blur runs
  after the normalisation, on the planar (CHW) view: a blur is a weighted mean, so it commutes with the
  per-channel affine normalisation and, being symmetric, with the flip.
* Colour: one brightness_contrast (uint8, a lookup table: ~5 ms a batch of 224 px views) and one
  color_twist to float (~30 ms), clamped with ``min``/``max`` (~4.5 ms; DALI's ``clamp`` ~24 ms, a
  saturating cast to uint8 ~22 ms, color_twist's own uint8 output ~89 ms), then crop_mirror_normalize
  from float (~14 ms, from uint8 ~9 ms). Every sample runs it, the ones without a jitter coin with the
  identity: a conditional needs one output type in both branches, and measured no faster. The
  parameters drawn in numpy instead of by DALI random and arithmetic operators (8 per view) and fed as
  dense arrays (~2 ms a batch; lists of per-sample arrays ~13 ms): ~4% less CPU an image (A/B, 5 runs).
* Views leave as ``torch.from_dlpack`` of DALI's outputs, without a copy (~120 MB per batch saved): the
  dynamic executor (``exec_dynamic=True``) hands every run fresh, reference-counted buffers, so a view
  stays valid and unchanged after later runs. On GPU the views are copied on the current torch stream.
* ``n_threads`` = number of free cores; 3 threads on 2 cores measured no better than 2.
* Few small operators: each costs ~0.1 ms of scheduling per batch whatever its work (400 trivial ops:
  ~35 ms CPU, ~65 ms wall per batch), so the colour and blur draws are made in numpy (above) and only
  the crops and flips draw inside the graph.
* Bad input: one undecodable image makes DALI raise and leaves the pipeline object unusable. We then
  rebuild the pipeline (~50-100 ms), find the offenders by decoding each sample alone through a one-sample
  decode-only pipeline (~50 ms for a batch of 64 with 1 or 3 offenders; that pipeline rebuilds in ~2 ms
  after each failure) rather than bisecting (~130-190 ms: a rebuild per failing half and log2(B) decodes
  of every sample), drop them, count each via ``on_bad("decode_error")`` and run the rest. The returned
  batch may therefore be smaller than the input: the caller refills to full size later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from streamssl.augment.spec import CropGroup, MultiCropSpec, encoded_bytes

log = logging.getLogger("streamssl.augment")

OnBad = Callable[[str], None]
_INPUT = "encoded"


def _coin(fn: Any, types: Any, p: float) -> Any:
    """A per-sample coin that is 1 with probability p: a DALI int32 node, or a plain 0/1 when p is 0 or 1
    (then the graph has no coin and conditionals on it are resolved when the graph is built)."""
    if p <= 0:
        return 0
    if p >= 1:
        return 1
    return fn.random.coin_flip(probability=p, dtype=types.INT32)


def _define_graph(spec: MultiCropSpec, *, gpu: bool, fused_decode: bool) -> tuple[Any, ...]:
    """The multi-crop graph; called inside a DALI pipeline context. Returns V nodes of (B, 3, S, S)."""
    from nvidia.dali import fn, types

    encoded = fn.external_source(name=_INPUT, dtype=types.UINT8, ndim=1)
    decoder_device = "mixed" if gpu else "cpu"
    decoded = None
    if not fused_decode:
        decoded = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)  # (H, W, 3) u8
    views = []
    for index, group in enumerate(spec.view_groups):
        view = _crop(fn, types, spec, group, encoded, decoded, decoder_device)
        views.append(_distort(fn, types, spec, index, view))
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
    return fn.external_source(name=_draw_name(index, name), dtype=dtype, ndim=ndim)


def _draw_name(index: int, name: str) -> str:
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
    the coin is down; those samples skip the blur).
    """
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


def _reason(exc: Exception) -> str:
    """The telling line of a DALI error (its messages open with generic "Critical error" lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    telling = [ln for ln in lines if not ln.startswith(("Critical error", "Current pipeline", "Error in"))]
    return (telling or lines or [type(exc).__name__])[0][:200]


class DaliMultiCrop:
    """SwAV multi-crop views of a batch of encoded images, on DALI.

    Args:
        spec: the multi-crop recipe.
        batch_size: the largest batch a call takes at once (longer batches are split into chunks of it).
        device: "cpu" (DALI CPU mode) or "cuda"/"cuda:N" (decode with nvJPEG, augment on the GPU; views are
            returned on that device).
        n_threads: DALI worker threads; the number of free cores is best on CPU.
        seed: seed of the augmentation RNG (a rebuilt pipeline continues from a derived seed).
        on_bad: called with a reason ("decode_error", "augment_error") once per dropped input.
        fused_decode: decode only each crop's region (``decoders.image_random_crop``) instead of decoding
            the image once; pays off only for images much larger than the views.

    Call it with a list of encoded images (bytes or objects with ``.data``): it returns the V view batches
    ``[(B', 3, S_v, S_v)] * V`` in ``spec.view_sizes`` order, and the indices (into the input list) of the
    B' <= B images they come from. Undecodable inputs are dropped and counted, never raised; a batch of
    only bad inputs gives V tensors with B' = 0.
    """

    def __init__(self, spec: MultiCropSpec, batch_size: int, *, device: str = "cpu", n_threads: int = 2,
                 seed: int = 0, on_bad: OnBad | None = None, fused_decode: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = spec
        self.batch_size = batch_size
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
        self.n_threads = n_threads
        self.seed = seed
        self.on_bad = on_bad
        self.fused_decode = fused_decode
        self.n_rebuilds = 0
        self._rng = np.random.default_rng(seed)  # colour and blur draws (view_draws); DALI draws crops, flips
        self._pipe: Any = None
        self._checker: Any = None
        self._pipe = self._build()

    # -- pipelines -----------------------------------------------------------------------------------

    def _device_id(self) -> int | None:
        if self.device.type == "cpu":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _build(self) -> Any:
        from nvidia.dali import pipeline_def

        spec, gpu, fused = self.spec, self.device.type == "cuda", self.fused_decode

        # pipeline_def (not a bare Pipeline) so that AutoGraph turns `if node:` into DALI conditionals.
        # A rebuilt pipeline gets a new seed: re-running the old one would repeat the same draws.
        @pipeline_def(batch_size=self.batch_size, num_threads=self.n_threads, device_id=self._device_id(),
                      seed=self.seed + 7919 * self.n_rebuilds, prefetch_queue_depth=1,
                      enable_conditionals=True, exec_dynamic=True)
        def multicrop() -> tuple[Any, ...]:
            return _define_graph(spec, gpu=gpu, fused_decode=fused)

        pipe = multicrop()
        pipe.build()
        return pipe

    def _build_checker(self) -> Any:
        """A one-sample, decode-only pipeline that tells whether DALI can decode an image."""
        from nvidia.dali import Pipeline, fn, types

        pipe = Pipeline(batch_size=1, num_threads=1, device_id=self._device_id(), seed=self.seed,
                        prefetch_queue_depth=1)
        with pipe:
            encoded = fn.external_source(name=_INPUT, dtype=types.UINT8, ndim=1)
            decoder_device = "mixed" if self.device.type == "cuda" else "cpu"
            pipe.set_outputs(fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB))
        pipe.build()
        return pipe

    def _rebuild(self) -> None:
        self.n_rebuilds += 1
        old, self._pipe = self._pipe, None
        del old  # release its threads and buffers before the new one takes its own
        self._pipe = self._build()

    def _run(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """One run of the main pipeline on 1..batch_size encoded images; V tensors (n, 3, S, S)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        n = len(arrays)
        self._pipe.feed_input(_INPUT, arrays)
        for index, group in enumerate(self.spec.view_groups):
            for name, values in view_draws(self.spec, group, self._rng, n).items():
                self._pipe.feed_input(_draw_name(index, name), values)  # one dense array: cheaper than a list
        outputs = self._pipe.run()
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        views = []
        for out, size in zip(outputs, self.spec.view_sizes, strict=True):
            if stream is None:
                # CPU: no copy. The dynamic executor hands each run fresh, reference-counted outputs, so the
                # tensor may alias DALI's buffer: it stays valid and unchanged after later runs.
                view = torch.from_dlpack(out.as_tensor())  # (n, 3, S, S)
            else:
                view = torch.empty((n, 3, size, size), dtype=torch.float32, device=self.device)
                feed_ndarray(out.as_tensor(), view, cuda_stream=stream)  # (n, 3, S, S), stream-ordered copy
            views.append(view)
        return views

    def _decodes(self, array: np.ndarray) -> bool:
        """Whether DALI decodes this one image; rebuilds the checker when it does not."""
        if self._checker is None:
            self._checker = self._build_checker()
        try:
            self._checker.feed_input(_INPUT, [array])
            self._checker.run()
            return True
        except Exception:
            old, self._checker = self._checker, None
            del old
            return False

    # -- public --------------------------------------------------------------------------------------

    def _empty(self) -> list[torch.Tensor]:
        return [torch.empty((0, 3, s, s), dtype=torch.float32, device=self.device) for s in self.spec.view_sizes]

    def _bad(self, reason: str) -> None:
        if self.on_bad is not None:
            self.on_bad(reason)

    def __call__(self, batch: Sequence[Any]) -> tuple[list[torch.Tensor], list[int]]:
        """Views of ``batch`` (encoded images: bytes or Samples) and the indices of the inputs kept.

        Returns ``(views, kept)``: V tensors (B', 3, S_v, S_v) float32, normalised, and the B' input indices
        they come from, in input order. B' < len(batch) when inputs were undecodable (each counted through
        ``on_bad``); the caller refills to full size later.
        """
        chunks_views: list[list[torch.Tensor]] = []
        kept: list[int] = []
        for start in range(0, len(batch), self.batch_size):
            views, chunk_kept = self._call_chunk(batch[start:start + self.batch_size])
            if chunk_kept:
                chunks_views.append(views)
                kept += [start + i for i in chunk_kept]
        if not chunks_views:
            return self._empty(), []
        if len(chunks_views) == 1:
            return chunks_views[0], kept
        return [torch.cat(parts) for parts in zip(*chunks_views, strict=True)], kept

    def _call_chunk(self, batch: Sequence[Any]) -> tuple[list[torch.Tensor], list[int]]:
        index: list[int] = []
        arrays: list[np.ndarray] = []
        for i, item in enumerate(batch):
            data = encoded_bytes(item)
            if len(data) == 0:  # DALI cannot even be fed an empty sample
                self._bad("decode_error")
                continue
            index.append(i)
            arrays.append(np.frombuffer(data, dtype=np.uint8))
        if not arrays:
            return self._empty(), []
        try:
            return self._run(arrays), index
        except Exception as exc:  # DALI raises RuntimeError; the pipeline object is now unusable
            log.warning("augment: DALI failed on a batch of %d (%s); rebuilding and dropping the offenders",
                        len(arrays), _reason(exc))
            self._rebuild()
        good = [k for k, a in enumerate(arrays) if self._decodes(a)]
        for _ in range(len(arrays) - len(good)):
            self._bad("decode_error")
        if not good:
            return self._empty(), []
        try:
            return self._run([arrays[k] for k in good]), [index[k] for k in good]
        except Exception:
            self._rebuild()
        return self._one_by_one([arrays[k] for k in good], [index[k] for k in good])

    def _one_by_one(self, arrays: list[np.ndarray], index: list[int]) -> tuple[list[torch.Tensor], list[int]]:
        """Last resort when every image decodes alone but the batch still fails: run each image alone
        through the full pipeline, dropping those that fail. Slow, and never expected in practice."""
        parts: list[list[torch.Tensor]] = []
        kept: list[int] = []
        for array, i in zip(arrays, index, strict=True):
            try:
                parts.append(self._run([array]))
                kept.append(i)
            except Exception:
                self._rebuild()
                self._bad("augment_error")
        if not parts:
            return self._empty(), []
        return [torch.cat(views) for views in zip(*parts, strict=True)], kept


__all__ = ["DaliMultiCrop", "view_draws"]
