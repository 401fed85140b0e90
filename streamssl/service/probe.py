"""The live probe: kNN accuracy of the current trunk on a small labeled set, every N steps of the daemon.

The labeled set is loaded and turned into input tensors once, at start (``probe.limit_train`` +
``probe.limit_test`` images at the run's global view size); each probe is then a forward pass of the frozen
trunk in eval mode over those tensors and a weighted kNN vote (k = 20, T = 0.07, as ``streamssl eval knn``).
Training waits while it runs, so it is kept small and bounded: a probe that exceeds ``probe.max_s`` is
abandoned. Its duration is exported next to its accuracy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.config import ProbeConfig
from streamssl.learner.evaluate import knn_classify, load_splits, to_tensor, topk_accuracy

log = logging.getLogger("streamssl.service.probe")


class LiveProbe:
    """kNN accuracy of a trunk on a fixed labeled set.

    Args:
        cfg: dataset, limits, k, temperature, time bound.
        size: input side in pixels (the run's global view size).
        mean, std: the run's input normalisation.
        device: where the trunk runs.
        batch: images per forward pass.
    """

    def __init__(self, cfg: ProbeConfig, *, size: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str = "cpu", batch: int = 256) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.batch = batch
        train, test = load_splits(cfg.dataset, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
        self.n_classes = max(train.n_classes, test.n_classes)
        self.train_x = torch.stack([to_tensor(im, size, mean, std) for im in train.images])  # (N, 3, S, S)
        self.test_x = torch.stack([to_tensor(im, size, mean, std) for im in test.images])
        self.train_y = torch.from_numpy(train.labels)
        self.test_y = torch.from_numpy(test.labels)
        self.n_abandoned = 0

    @torch.no_grad()
    def _features(self, trunk: nn.Module, x: Tensor, deadline: float) -> Tensor | None:
        out = []
        for start in range(0, x.shape[0], self.batch):
            if time.monotonic() > deadline:
                return None
            out.append(trunk(x[start:start + self.batch].to(self.device)).float().cpu())
        return F.normalize(torch.cat(out), dim=1)

    def measure(self, trunk: nn.Module) -> tuple[float, float] | None:
        """(top-1 accuracy, seconds), or None when the probe ran past ``max_s`` and was abandoned."""
        start = time.monotonic()
        deadline = start + self.cfg.max_s
        was_training = trunk.training
        trunk.eval()
        try:
            train_f = self._features(trunk, self.train_x, deadline)
            test_f = self._features(trunk, self.test_x, deadline) if train_f is not None else None
        finally:
            trunk.train(was_training)
        if train_f is None or test_f is None:
            self.n_abandoned += 1
            log.warning("probe abandoned after %.1f s (probe.max_s); lower probe.limit_train/limit_test",
                        time.monotonic() - start)
            return None
        votes = knn_classify(train_f, self.train_y, test_f, self.n_classes, k=self.cfg.k,
                             temperature=self.cfg.temperature)
        return topk_accuracy(votes, self.test_y, ks=(1,))["top1"], time.monotonic() - start
