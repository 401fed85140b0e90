"""Diagnostic for the quality benchmark: weighted kNN top-1 of each ResNet stage's average-pooled output.

Not the benchmark's protocol (that scores the trunk's pooled output only): a look at where in a frozen trunk
the kNN accuracy is made. For a streamssl checkpoint (``ckpt-*.pt``) or a ``benchmarks/lightly_swav.py``
snapshot (``snap-*.pt``), it prints top-1 for layer2, layer3, layer4 and layer3 and layer4 side by side (each
L2-normalised), with the kNN of ``streamssl.eval`` (k=20, T=0.07) on Fashion-MNIST at 28 px. Example::

    python benchmarks/stage_knn.py runs/quality/streamssl/ckpt-000000000481.pt --limit-train 30000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.eval import (
    FASHION_MNIST_DIR,
    LabeledImages,
    extract,
    knn_classify,
    load_splits,
    load_trunk,
    topk_accuracy,
)

STAGES = ("layer2", "layer3", "layer4")
MEAN, STD = (0.286,) * 3, (0.353,) * 3  # the fmnist-cpu profile's normalisation


def stage_features(trunk: nn.Module, data: LabeledImages) -> dict[str, Tensor]:
    """(N, C) L2-normalised average-pooled output of every stage in STAGES, one pass through the trunk."""
    pooled: dict[str, list[Tensor]] = {name: [] for name in STAGES}
    hooks = [getattr(trunk, name).register_forward_hook(
        lambda _m, _i, out, name=name: pooled[name].append(out.float().mean(dim=(2, 3)))) for name in STAGES]
    try:
        extract(trunk, data, size=28, mean=MEAN, std=STD)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: F.normalize(torch.cat(parts), dim=1) for name, parts in pooled.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="streamssl ckpt-*.pt or lightly_swav.py snap-*.pt")
    p.add_argument("--fashion-mnist", default=FASHION_MNIST_DIR, help="Folder of the Fashion-MNIST idx files.")
    p.add_argument("--limit-train", type=int, default=0, help="kNN memory: at most this many images (0: all).")
    p.add_argument("--limit-test", type=int, default=0, help="At most this many test images (0: all).")
    args = p.parse_args(argv)
    if args.checkpoint.name.startswith("snap-"):
        from lightly_swav import load_snapshot_trunk

        trunk, _ = load_snapshot_trunk(args.checkpoint)
    else:
        trunk, _ = load_trunk(args.checkpoint)
    train, test = load_splits(f"fashion-mnist:{args.fashion_mnist}", limit_train=args.limit_train,
                              limit_test=args.limit_test)
    with torch.no_grad():
        a, b = stage_features(trunk, train), stage_features(trunk, test)
    a["layer3+4"] = torch.cat([a["layer3"], a["layer4"]], dim=1)
    b["layer3+4"] = torch.cat([b["layer3"], b["layer4"]], dim=1)
    labels_train, labels_test = torch.as_tensor(train.labels), torch.as_tensor(test.labels)
    n_classes = max(train.n_classes, test.n_classes)
    for name in a:
        scores = knn_classify(F.normalize(a[name], dim=1), labels_train, F.normalize(b[name], dim=1), n_classes)
        print(f"{name:<9}{a[name].shape[1]:>6} dims  kNN top-1 {100 * topk_accuracy(scores, labels_test)['top1']:.2f}%",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
