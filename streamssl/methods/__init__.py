"""The self-supervised methods the engine (engine.py) trains, one file each; base.py says what a method is.

``learner.method`` names one of ``METHODS``; ``make_method`` builds it.
"""

from __future__ import annotations

import torch

from streamssl.config import LearnerConfig, ModelConfig
from streamssl.methods.base import Diagnostic, Method
from streamssl.methods.swav import SwAV
from streamssl.sinkhorn import Reduce

METHODS: dict[str, type[Method]] = {"swav": SwAV}


def make_method(model_cfg: ModelConfig, cfg: LearnerConfig, *, device: torch.device,
                reduce: Reduce | None = None) -> Method:
    """The method ``cfg.method`` names, on the CPU until the engine moves it (state that is not a module's,
    such as a queue, is made on ``device`` at once)."""
    try:
        cls = METHODS[cfg.method]
    except KeyError:
        raise ValueError(f"learner.method {cfg.method!r}: one of {', '.join(METHODS)}") from None
    return cls(model_cfg, cfg, device=device, reduce=reduce)


__all__ = ["METHODS", "Diagnostic", "Method", "SwAV", "make_method"]
