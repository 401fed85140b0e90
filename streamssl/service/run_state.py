"""The daemon's state, kept safe and shared: checkpoints (restore, write, the final one, then the acks they
allow), the prototype store (published tensors, heartbeats) and the live probe. A part of ``Daemon``
(daemon.py), kept apart so that the loop reads on its own; it uses the daemon's attributes."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from typing import Any

import torch

from streamssl import distributed
from streamssl.errors import RuntimeFailure
from streamssl.learner.engine import StepStats
from streamssl.service.checkpoint import CheckpointError, CheckpointWriteError, rng_state, set_rng_state
from streamssl.service.ranks import rank_part, take_rank_part
from streamssl.service.resume import check_fits, does_not_fit

log = logging.getLogger("streamssl.service.daemon")


class RunState:
    """Checkpoints, store and probe of a ``Daemon`` (see the module docstring)."""

    cfg: Any
    learner: Any

    def restore(self) -> bool:
        """Resume from the newest checkpoint in checkpoint.dir (when resume is on). True when it did."""
        if not self.cfg.checkpoint.resume:
            return False
        # Loaded on the CPU: the learner moves its tensors to its device, and the RNG states must stay CPU
        # tensors (torch.set_rng_state and torch.cuda.set_rng_state_all refuse CUDA ones).
        # Several ranks: rank 0 reads it and hands it to the others (only rank 0 needs the checkpoint folder).
        state = self.checkpoints.load(map_location="cpu") if self.world.is_main else None
        state = distributed.broadcast_object(state)
        if state is None:
            return False
        same_source = check_fits(state["path"], state.get("config") or {}, self.cfg)
        learner_state, part = state["learner"], take_rank_part(state, self.world, self.learner.method)
        if "ranks" in state or self.world.distributed:
            learner_state = {**learner_state, "extra": part["extra"]}  # this rank's own method state
        try:
            self.learner.load_state_dict(learner_state)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(does_not_fit(state["path"], str(exc))) from None
        set_rng_state(part["rng"])
        self.position = part["position"] if same_source else None
        self._replay_state = part["replay"] if same_source else None  # what arrived before the position
        self.images = int(state.get("images", 0))
        self._last_ckpt_step = self.learner.step_count
        self._last_ckpt_path = state["path"]
        self.metrics.checkpoint_written(float(state.get("saved_at", time.time())))
        self.echo(f"resumed from {state['path']} at step {self.learner.step_count} ({self.images} images)")
        return True

    def checkpoint(self) -> str | None:
        """Write a checkpoint of everything, then ack the shards it covers. None when the write failed: that
        is logged and counted, training goes on, and the next interval tries again."""
        state = {"learner": self.learner.state_dict(), "rng": rng_state(), "position": self.position,
                 "images": self.images, "config": self.cfg.to_dict(),
                 "replay": self.replay.state_dict() if self.replay is not None else self._replay_state}
        try:
            if self.world.distributed:  # every rank's own part, gathered; rank 0 writes (ranks.py)
                parts = distributed.gather_objects(rank_part(state["rng"], state["position"], state["replay"],
                                                             self.learner.method))
                path, message = None, None
                if self.world.is_main:
                    try:
                        path = self.checkpoints.save({**state, "ranks": parts}, self.learner.step_count)
                    except CheckpointWriteError as exc:
                        message = str(exc)
                path, message = distributed.broadcast_object((path and str(path), message))
                if message is not None:
                    raise CheckpointWriteError(message)
            else:
                path = self.checkpoints.save(state, self.learner.step_count)
        except CheckpointWriteError as exc:
            self.metrics.checkpoint_failed()
            self._last_ckpt_time = time.monotonic()  # retry at the next interval, not at every step
            log.error("%s; training goes on and the next checkpoint interval tries again (the last checkpoint is "
                      "%s; shards are acknowledged only once a checkpoint covers them)", exc, self._last_ckpt_path)
            self.last_checkpoint_error = exc
            return None
        self.last_checkpoint_error = None
        if self.stream is not None and self.position is not None:
            self.stream.commit(self.position)
        self._last_ckpt_time, self._last_ckpt_step, self._last_ckpt_path = (
            time.monotonic(), self.learner.step_count, str(path))
        self.metrics.checkpoint_written(time.time())
        if self.writer is not None:
            self.writer.record_checkpoint({"path": str(path), "step": self.learner.step_count, "time": time.time()})
        return str(path)

    def publish_prototypes(self) -> None:
        """The method's published tensor (SwAV's prototypes) to the store; nothing for a method without one."""
        published = self.learner.method.published()
        if published is None or self.writer is None:  # the other ranks hold no store
            return
        protos = published.detach().float().cpu()
        if self._published is not None:
            drift = 1 - torch.nn.functional.cosine_similarity(protos, self._published, dim=1).mean()
            self.metrics.prototype_drift(float(drift))
        self._published = protos.clone()
        self.writer.submit(protos.numpy(), self.learner.step_count)

    def heartbeat(self, stats: StepStats | None) -> None:
        if self.writer is None:
            return
        info: dict[str, str | int | float] = {"step": self.learner.step_count, "images": self.images,
                                               "pid": os.getpid(), "host": socket.gethostname()}
        if stats is not None and math.isfinite(stats.loss):
            info["loss"] = round(stats.loss, 4)
        self.writer.heartbeat(self.learner_id, info, self.cfg.store.heartbeat_ttl_s)
        self._last_heartbeat = time.monotonic()

    def run_probe(self) -> None:
        assert self.probe is not None
        result = self.probe.measure(self.learner.model.trunk)
        if result is None:
            return
        top1, seconds = result
        self.metrics.probe_accuracy(top1, seconds)
        self.history.event({"time": round(time.time(), 3), "event": "probe", "step": self.learner.step_count,
                            "probe_top1": top1, "probe_seconds": round(seconds, 3)})
        self.echo(f"probe   {self.learner.step_count:>7} | kNN top-1 {top1:.3f} on {len(self.probe.test_y)} images "
                  f"({seconds:.1f} s)")

    # ------------------------------------------------------------------ loop

    def _final_checkpoint(self, path: str | None) -> str | None:
        if self.learner.step_count == self._last_ckpt_step:
            return path
        written = self.checkpoint()
        if written is None and self.error is None:
            self.error = RuntimeFailure(
                f"the final checkpoint was not written ({self.last_checkpoint_error}); the training since the last "
                f"checkpoint ({self._last_ckpt_path or 'none'}) is lost, and the shards it read are read again "
                "after a restart")
        return written or path


__all__ = ["RunState"]
