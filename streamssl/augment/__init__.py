"""SwAV multi-crop views from encoded images: DALI (dali.py) or its torchvision twin (reference.py).

The augment stage of the flow (samples -> augment -> learner): a batch of encoded images (bytes, or the
``Sample`` objects of shards.py) goes in, V view batches ``[(B', 3, S_v, S_v)] * V`` of normalised float32
come out, in ``MultiCropSpec.view_sizes`` order, with the indices of the B' <= B inputs they come from
(undecodable inputs are dropped and counted through ``on_bad``; the caller refills its batch later).

``make_multicrop`` picks the backend from ``AugmentConfig.backend``; both backends are called the same way.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from streamssl.augment.spec import CropGroup, MultiCropSpec
from streamssl.config import AugmentConfig

log = logging.getLogger("streamssl.augment")

_fallback_logged = False  # "auto" tells once per process that it fell back to torchvision


class MultiCrop(Protocol):
    """What every backend is: ``(batch) -> (views, kept)``."""

    spec: MultiCropSpec
    batch_size: int

    def __call__(self, batch: Sequence[Any]) -> tuple[list[torch.Tensor], list[int]]: ...


def dali_import_error() -> Exception | None:
    """None when ``nvidia.dali`` imports here, else the exception importing it raised."""
    try:
        importlib.import_module("nvidia.dali")
    except Exception as exc:  # ImportError, or a broken install raising anything else on import
        return exc
    return None


def make_multicrop(cfg: AugmentConfig, batch_size: int, *, device: str = "cpu",
                   on_bad: Callable[[str], None] | None = None) -> MultiCrop:
    """The multi-crop of ``cfg`` on the backend ``cfg.backend`` names.

    Args:
        cfg: the augment configuration (spec, backend, threads, seed).
        batch_size: the largest batch one call takes.
        device: "cpu" or "cuda[:N]": where DALI runs and where the views are returned.
        on_bad: called with a reason ("decode_error", ...) once per dropped input.

    "auto" uses DALI when ``nvidia.dali`` imports and the torchvision twin otherwise (logged once);
    "dali" without DALI raises a RuntimeError that says how to install it.
    """
    global _fallback_logged
    spec = MultiCropSpec.from_config(cfg)
    backend = cfg.backend
    if backend in ("auto", "dali"):
        error = dali_import_error()
        if error is None:
            from streamssl.augment.dali import DaliMultiCrop

            return DaliMultiCrop(spec, batch_size, device=device, n_threads=cfg.n_threads, seed=cfg.seed,
                                 on_bad=on_bad)
        if backend == "dali":
            raise RuntimeError(f"augment.backend=dali but nvidia.dali cannot be imported ({error}). Install it "
                               "(pip install 'streamssl[dali]', or nvidia-dali-cuda120 for older drivers) or "
                               "set augment.backend=torchvision or auto.") from error
        if not _fallback_logged:
            log.warning("augment.backend=auto: nvidia.dali is not importable (%s); using the torchvision twin, "
                        "which is several times slower on CPU", error)
            _fallback_logged = True
    elif backend != "torchvision":
        raise ValueError(f"augment.backend: dali, torchvision or auto, got {backend!r}")
    from streamssl.augment.reference import TorchvisionMultiCrop

    # On a GPU machine the twin decodes in n_threads worker processes, or it starves the learner; on a CPU run
    # it stays in the feeder thread, beside a learner that needs the same cores.
    workers = cfg.n_threads if torch.device(device).type == "cuda" else 0
    return TorchvisionMultiCrop(spec, batch_size, device=device, seed=cfg.seed, on_bad=on_bad, workers=workers)


__all__ = ["CropGroup", "MultiCrop", "MultiCropSpec", "dali_import_error", "make_multicrop"]
