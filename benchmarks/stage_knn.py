"""Diagnostic for the quality benchmark: weighted kNN top-1 of each ResNet stage's average-pooled output.

Not the benchmark's protocol (that scores the trunk's pooled output only): a look at where in a frozen trunk
the kNN accuracy is made. For a streamssl checkpoint (``ckpt-*.pt``) or a ``benchmarks/lightly_baseline.py``
snapshot (``snap-*.pt``), it prints top-1 for layer2, layer3, layer4 and layer3 and layer4 side by side (each
L2-normalised), with the kNN of ``streamssl.learner.evaluate`` (k=20, T=0.07) on Fashion-MNIST, at the run's global view
size and normalisation (read from the checkpoint, as ``benchmarks/quality.py`` does). Example::

    python benchmarks/stage_knn.py runs/quality/streamssl/ckpt-000000000481.pt --limit-train 30000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.learner.evaluate import (
    FASHION_MNIST_DIR,
    LabeledImages,
    extract,
    knn_classify,
    load_splits,
    topk_accuracy,
)
from streamssl.service.checkpoint import load_trunk

STAGES = ("layer2", "layer3", "layer4")


def load(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trunk of a streamssl checkpoint or a lightly_baseline.py snapshot, and its views' settings (sizes, mean,
    std): the augment section of the streamssl run's configuration, or the snapshot's config."""
    if path.name.startswith("snap-"):
        from lightly_baseline import load_snapshot_trunk

        trunk, info = load_snapshot_trunk(path)
        return trunk, info["config"]
    trunk, config = load_trunk(path)
    return trunk, config["augment"]


def stage_features(trunk: nn.Module, data: LabeledImages, views: dict[str, Any]) -> dict[str, Tensor]:
    """(N, C) L2-normalised average-pooled output of every stage in STAGES and of layer3 and layer4 side by
    side (``layer3+4``), one pass through the trunk at the global view size."""
    pooled: dict[str, list[Tensor]] = {name: [] for name in STAGES}
    hooks = [getattr(trunk, name).register_forward_hook(
        lambda _m, _i, out, name=name: pooled[name].append(out.float().mean(dim=(2, 3)))) for name in STAGES]
    try:
        extract(trunk, data, size=int(views["sizes"][0]), mean=views["mean"], std=views["std"])
    finally:
        for hook in hooks:
            hook.remove()
    feats = {name: F.normalize(torch.cat(parts), dim=1) for name, parts in pooled.items()}
    feats["layer3+4"] = F.normalize(torch.cat([feats["layer3"], feats["layer4"]], dim=1), dim=1)
    return feats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="streamssl ckpt-*.pt or lightly_baseline.py snap-*.pt")
    p.add_argument("--fashion-mnist", default=FASHION_MNIST_DIR, help="Folder of the Fashion-MNIST idx files.")
    p.add_argument("--limit-train", type=int, default=0, help="kNN memory: at most this many images (0: all).")
    p.add_argument("--limit-test", type=int, default=0, help="At most this many test images (0: all).")
    args = p.parse_args(argv)
    trunk, views = load(args.checkpoint)
    train, test = load_splits(f"fashion-mnist:{args.fashion_mnist}", limit_train=args.limit_train,
                              limit_test=args.limit_test)
    with torch.no_grad():
        a, b = stage_features(trunk, train, views), stage_features(trunk, test, views)
    labels_train, labels_test = torch.as_tensor(train.labels), torch.as_tensor(test.labels)
    n_classes = max(train.n_classes, test.n_classes)
    for name in a:
        scores = knn_classify(a[name], labels_train, b[name], n_classes)
        print(f"{name:<9}{a[name].shape[1]:>6} dims  kNN top-1 {100 * topk_accuracy(scores, labels_test)['top1']:.2f}%",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
