"""Whether a checkpoint fits the run that wants to resume it: the same optimizer, and the same stream unless
``checkpoint.allow_new_source`` says otherwise. Model shapes are checked by ``load_state_dict`` itself; its
error is worded by ``does_not_fit`` too."""

from __future__ import annotations

import logging
from typing import Any

from streamssl.config import Config
from streamssl.service.checkpoint import CheckpointError
from streamssl.urls import redact

log = logging.getLogger("streamssl.service.daemon")


def does_not_fit(path: str, why: str) -> str:
    return (f"the checkpoint {path} does not fit the configured run ({why}); resume it with the configuration "
            "it was written with (stored inside it: `streamssl config show` of that file's config), or start "
            "fresh with another checkpoint.dir or checkpoint.resume=false")


def check_fits(path: str, saved: dict[str, Any], cfg: Config) -> bool:
    """Refuse a checkpoint whose optimizer, or whose stream (unless allowed), differs from this run's.
    Returns whether it was written on this run's stream (its position then applies)."""
    optimizer = (saved.get("learner") or {}).get("optimizer")
    if optimizer is not None and optimizer != cfg.learner.optimizer:
        raise CheckpointError(does_not_fit(path, f"it was trained with learner.optimizer={optimizer}, "
                                                 f"this run asks for {cfg.learner.optimizer}"))
    if "source" not in saved:  # a checkpoint without a configuration (tests, tools): nothing to compare
        return True
    ours = [redact(u) for u in cfg.source.urls]
    theirs = [redact(u) for u in saved["source"].get("urls", [])]
    if theirs == ours:
        return True
    if not cfg.checkpoint.allow_new_source:
        raise CheckpointError(
            f"checkpoint.dir {cfg.checkpoint.dir!r} holds a run on source.urls {theirs or '(the demo)'}, "
            f"but this run reads {ours or '(the demo)'}: give this run a folder of its own (--set "
            "checkpoint.dir=runs/NAME), or set checkpoint.allow_new_source=true to continue that model on "
            "this stream from its start")
    log.warning("checkpoint %s was written on source.urls %s; continuing its model on %s from the stream's "
                "start (checkpoint.allow_new_source)", path, theirs, ours)
    return False


__all__ = ["check_fits", "does_not_fit"]
