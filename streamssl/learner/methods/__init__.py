"""The self-supervised methods the engine (engine.py) trains, one file each; base.py says what a method is.

``learner.method`` names one of ``METHODS``; ``make_method`` builds it with its own configuration section
(``[simclr]``, ``[moco]``, ``[byol]``, ``[deepcluster]``, ``[npid]``; SwAV's settings are in ``[learner]``), which
``method_settings`` picks.
"""

from __future__ import annotations

from typing import Any

import torch

from streamssl.config import Config, LearnerConfig, ModelConfig
from streamssl.learner.methods.base import Diagnostic, Method
from streamssl.learner.methods.byol import BYOL
from streamssl.learner.methods.deepcluster import DeepClusterV2
from streamssl.learner.methods.moco import MoCo
from streamssl.learner.methods.npid import NPID
from streamssl.learner.methods.simclr import SimCLR
from streamssl.learner.methods.sinkhorn import Reduce
from streamssl.learner.methods.swav import SwAV

METHODS: dict[str, type[Method]] = {"swav": SwAV, "simclr": SimCLR, "moco": MoCo, "byol": BYOL,
                                     "deepcluster": DeepClusterV2, "npid": NPID}


def method_settings(cfg: Config) -> Any:
    """The configuration section of the run's method (None for SwAV, whose settings are in ``learner``)."""
    return getattr(cfg, cfg.learner.method, None)


def make_method(model_cfg: ModelConfig, cfg: LearnerConfig, *, device: torch.device,
                reduce: Reduce | None = None, settings: Any = None) -> Method:
    """The method ``cfg.method`` names, on the CPU until the engine moves it (state that is not a module's,
    such as a queue, is made on ``device`` at once)."""
    try:
        cls = METHODS[cfg.method]
    except KeyError:
        raise ValueError(f"learner.method {cfg.method!r}: one of {', '.join(METHODS)}") from None
    return cls(model_cfg, cfg, device=device, reduce=reduce, settings=settings)


__all__ = [
    "BYOL", "METHODS", "NPID", "DeepClusterV2", "Diagnostic", "Method", "MoCo", "SimCLR", "SwAV", "make_method",
    "method_settings",
]
