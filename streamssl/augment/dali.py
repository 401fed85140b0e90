"""SwAV multi-crop on NVIDIA DALI: encoded image bytes in, V batches of normalised float32 NCHW views out.

The only module of streamssl that imports ``nvidia.dali``, and only inside functions, so that importing it
never fails where DALI is not installed. Implements the multi-crop of SwAV (Caron et al. 2020) as described
by a ``MultiCropSpec``; reference.py is its torchvision twin (same draws, same order of steps).

The graph (which DALI operators, in which order, and the draws made in numpy) is in dali_graph.py;
this module builds pipelines from it, runs them and handles bad input.

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
  decode-only pipeline on the CPU, whatever the main pipeline's device (~50 ms for a batch of 64 with 1 or 3
  offenders; that pipeline rebuilds in ~2 ms after each failure) rather than bisecting (~130-190 ms: a
  rebuild per failing half and log2(B) decodes of every sample), drop them, count each via
  ``on_bad("decode_error")`` and run the rest. The returned batch may therefore be smaller than the
  input: the caller refills to full size later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from streamssl.augment.dali_graph import INPUT, define_graph, draw_name, view_draws
from streamssl.augment.spec import MultiCropSpec, encoded_bytes

log = logging.getLogger("streamssl.augment")

OnBad = Callable[[str], None]
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
            return define_graph(spec, gpu=gpu, fused_decode=fused)

        pipe = multicrop()
        pipe.build()
        return pipe

    def _build_checker(self) -> Any:
        """A one-sample, decode-only pipeline on the CPU that tells whether DALI can decode an image.

        On the CPU whatever the main pipeline's device: it is rebuilt after every image it rejects, and a
        mixed (nvJPEG) pipeline costs a GPU context, device buffers and a decoder per rebuild. An image the
        CPU decodes but nvJPEG does not still fails the rerun of the batch; ``_one_by_one`` then drops it.
        """
        from nvidia.dali import Pipeline, fn, types

        pipe = Pipeline(batch_size=1, num_threads=1, device_id=None, seed=self.seed, prefetch_queue_depth=1)
        with pipe:
            encoded = fn.external_source(name=INPUT, dtype=types.UINT8, ndim=1)
            pipe.set_outputs(fn.decoders.image(encoded, device="cpu", output_type=types.RGB))
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
        self._pipe.feed_input(INPUT, arrays)
        for index, group in enumerate(self.spec.view_groups):
            for name, values in view_draws(self.spec, group, self._rng, n).items():
                self._pipe.feed_input(draw_name(index, name), values)  # one dense array: cheaper than a list
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
            self._checker.feed_input(INPUT, [array])
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
