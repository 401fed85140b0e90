"""Downstream evaluation of a frozen trunk: weighted kNN and a linear probe.

The kNN classifier is the one of Wu et al. 2018 (NPID) as later SSL papers use it: cosine similarity between
L2-normalised features, the k = 20 nearest training images vote with weight exp(similarity / 0.07), and the
class with the largest summed weight wins (top-5: the five largest). The linear probe is a multinomial
logistic regression on the frozen, standardised features (L-BFGS, no augmentation), its L2 weight chosen on a
held-out tenth of the training set, as in SimCLR's linear evaluation of frozen features.

Datasets (``--dataset`` specs):
  ``fashion-mnist`` or ``fashion-mnist:FOLDER``  the standard idx files (train / t10k); the default folder is
                                                where Debian's ``dataset-fashion-mnist`` installs them
  ``FOLDER``                                    an image folder, one sub-folder per class; with ``train/``
                                                and ``val/`` (or ``test/``) inside, those are the two splits
  ``PATTERN.tar``                               labeled WebDataset shards (``.cls``)
A single set without splits is divided 80/20 with a fixed seed.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import struct
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from streamssl.errors import UsageError
from streamssl.stream.images import IMAGE_EXTS

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetError(UsageError, ValueError):
    """A dataset spec names nothing usable (a missing folder, no labels, a wrong file)."""


@dataclass
class LabeledImages:
    """Images as uint8 (N, H, W, 3) arrays or encoded bytes, with (N,) int labels."""

    images: list[Any]  # np.ndarray (H, W, 3) uint8, or bytes
    labels: np.ndarray
    n_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> LabeledImages:
        return LabeledImages([self.images[i] for i in idx], self.labels[idx], self.n_classes)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, n_dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path}: not an idx file of unsigned bytes")
    shape = struct.unpack(f">{n_dims}I", data[4:4 + 4 * n_dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(f"{folder}: no {stem}(.gz); install dataset-fashion-mnist or give the folder")


def load_fashion_mnist(folder: str | Path = FASHION_MNIST_DIR, split: str = "train") -> LabeledImages:
    """Fashion-MNIST from its idx files; images as grey (28, 28) expanded to RGB."""
    folder = Path(folder)
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    rgb = np.repeat(images[..., None], 3, axis=-1)  # (N, 28, 28, 3)
    return LabeledImages(list(rgb), labels, 10)


def load_image_folder(folder: str | Path) -> LabeledImages:
    folder = Path(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{folder}: no class sub-folders")
    images, labels, other = [], [], Counter()
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if not path.is_file():
                continue
            if path.suffix.lower().lstrip(".") in IMAGE_EXTS:  # the stream's own list: what it would train on
                images.append(path.read_bytes())
                labels.append(label)
            else:
                other[path.suffix.lower() or "(none)"] += 1
    if other:
        log.warning("%s: %d file(s) skipped, not %s images: %s", folder, sum(other.values()), "/".join(IMAGE_EXTS),
                    ", ".join(f"{n} {ext}" for ext, n in other.most_common()))
    return LabeledImages(images, np.asarray(labels, dtype=np.int64), len(classes))


def load_shards(pattern: str) -> LabeledImages:
    from streamssl.stream.shards import read_shard
    from streamssl.stream.source import expand_pattern

    images, labels = [], []
    for url in expand_pattern(pattern):
        for _, sample in read_shard(url):
            if sample is not None and sample.label is not None:
                images.append(sample.data)
                labels.append(sample.label)
    if not labels:
        raise DatasetError(f"{pattern}: no labeled samples (.cls) found")
    return LabeledImages(images, np.asarray(labels, dtype=np.int64), int(max(labels)) + 1)


def load_splits(spec: str, *, limit_train: int = 0, limit_test: int = 0, seed: int = 0,
                ) -> tuple[LabeledImages, LabeledImages]:
    """(train, test) for a dataset spec (see the module docstring)."""
    if spec == "fashion-mnist" or spec.startswith("fashion-mnist:"):
        folder = spec.partition(":")[2] or FASHION_MNIST_DIR
        train, test = load_fashion_mnist(folder, "train"), load_fashion_mnist(folder, "test")
    elif Path(spec).is_dir():
        root = Path(spec)
        test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
        if (root / "train").is_dir() and test_dir is not None:
            train, test = load_image_folder(root / "train"), load_image_folder(test_dir)
        else:
            train, test = _holdout(load_image_folder(root), seed)
    else:
        if not set(spec) & set("*?[{") and "://" not in spec and not Path(spec).exists():
            raise DatasetError(f"dataset {spec!r}: no such folder or shard; give fashion-mnist[:FOLDER], an image "
                               "folder (one sub-folder per class) or a pattern of labeled shards")
        train, test = _holdout(load_shards(spec), seed)
    rng = np.random.default_rng(seed)
    if limit_train and len(train) > limit_train:
        train = train.subset(np.sort(rng.choice(len(train), limit_train, replace=False)))
    if limit_test and len(test) > limit_test:
        test = test.subset(np.sort(rng.choice(len(test), limit_test, replace=False)))
    return train, test


def _holdout(data: LabeledImages, seed: int) -> tuple[LabeledImages, LabeledImages]:
    order = np.random.default_rng(seed).permutation(len(data))
    cut = int(0.8 * len(data))
    return data.subset(np.sort(order[:cut])), data.subset(np.sort(order[cut:]))


# ---------------------------------------------------------------------------------------------- features


def to_tensor(image: Any, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """One image (uint8 HWC array or encoded bytes) -> normalised (3, size, size), resized with antialiasing."""
    if isinstance(image, bytes | bytearray):
        with Image.open(io.BytesIO(image)) as im:
            image = np.asarray(im.convert("RGB"))
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)  # (3, H, W)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _batches(data: LabeledImages, batch: int, size: int, mean, std) -> Iterator[Tensor]:
    for start in range(0, len(data), batch):
        yield torch.stack([to_tensor(im, size, mean, std) for im in data.images[start:start + batch]])


@torch.no_grad()
def extract(trunk: nn.Module | None, data: LabeledImages, *, size: int, mean: Sequence[float],
            std: Sequence[float], batch: int = 256, device: str | torch.device = "cpu") -> Tensor:
    """(N, F) L2-normalised features of the frozen ``trunk`` in eval mode (None: the raw pixels)."""
    feats = []
    if trunk is not None:
        was_training = trunk.training
        trunk.eval()
    for x in _batches(data, batch, size, mean, std):
        x = x.to(device)
        feats.append((trunk(x) if trunk is not None else x.flatten(1)).float().cpu())
    if trunk is not None and was_training:
        trunk.train()
    return F.normalize(torch.cat(feats), dim=1)


# ---------------------------------------------------------------------------------------------- classifiers


def knn_classify(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, n_classes: int, *,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """Weighted kNN votes: (N_test, n_classes) scores. Features must be L2-normalised."""
    k = min(k, train_feats.shape[0])
    out = []
    for start in range(0, test_feats.shape[0], chunk):
        sims = test_feats[start:start + chunk] @ train_feats.T  # (n, N_train)
        top_sims, top_idx = sims.topk(k, dim=1)  # (n, k)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], n_classes)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    result = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (scores.topk(k_eff, dim=1).indices == labels[:, None]).any(dim=1)
        result[f"top{k}"] = float(hit.float().mean())
    return result


WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # the probe's L2 grid, chosen on a held-out part of the train set


def _fit_logistic(x: Tensor, y: Tensor, n_classes: int, weight_decay: float, max_iter: int, seed: int) -> nn.Linear:
    """Multinomial logistic regression: cross-entropy + weight_decay * ||W||^2, full-batch L-BFGS."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=generator)
        layer.bias.zero_()
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return layer


def linear_probe(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, n_classes: int, *,
                 weight_decays: Sequence[float] = WEIGHT_DECAYS, holdout: float = 0.1, max_iter: int = 500,
                 seed: int = 0, chosen: dict[str, float] | None = None) -> Tensor:
    """Test scores of a multinomial logistic regression on standardised frozen features.

    The protocol of SimCLR's linear evaluation on frozen features (Chen et al. 2020, B.8): an L2-regularised
    softmax regression fitted with L-BFGS, no augmentation, the regularisation picked on a held-out part
    (``holdout``) of the training set, then refitted on all of it. One weight decay: no selection. The
    chosen weight decay and its held-out accuracy go into ``chosen`` when given.
    """
    mean, std = train_feats.mean(0), train_feats.std(0).clamp_min(1e-6)
    x_train, x_test = (train_feats - mean) / std, (test_feats - mean) / std
    best = float(weight_decays[0])
    if len(weight_decays) > 1:
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(holdout * len(x_train)))
        val, fit = order[:n_val], order[n_val:]
        accuracy = {}
        for wd in weight_decays:
            layer = _fit_logistic(x_train[fit], train_labels[fit], n_classes, float(wd), max_iter, seed)
            with torch.no_grad():
                accuracy[float(wd)] = float((layer(x_train[val]).argmax(1) == train_labels[val]).float().mean())
        best = max(accuracy, key=lambda wd: (accuracy[wd], wd))  # ties: the stronger regularisation
        if chosen is not None:
            chosen.update(weight_decay=best, holdout_top1=accuracy[best])
    layer = _fit_logistic(x_train, train_labels, n_classes, best, max_iter, seed)
    with torch.no_grad():
        return layer(x_test)


def evaluate(task: str, trunk: nn.Module | None, train: LabeledImages, test: LabeledImages, *, size: int,
             mean: Sequence[float], std: Sequence[float], k: int = 20, temperature: float = 0.07,
             device: str | torch.device = "cpu") -> dict[str, Any]:
    """kNN or linear-probe accuracy of ``trunk`` (None: raw pixels) as a JSON-able dict."""
    t = time.perf_counter()
    train_feats = extract(trunk, train, size=size, mean=mean, std=std, device=device)
    test_feats = extract(trunk, test, size=size, mean=mean, std=std, device=device)
    train_labels, test_labels = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    n_classes = max(train.n_classes, test.n_classes)
    if task == "knn":
        scores = knn_classify(train_feats, train_labels, test_feats, n_classes, k=k, temperature=temperature)
    elif task == "linear":
        chosen: dict[str, float] = {}
        scores = linear_probe(train_feats, train_labels, test_feats, n_classes, chosen=chosen)
    else:
        raise UsageError(f"unknown evaluation {task!r}: knn or linear")
    result: dict[str, Any] = {"task": task, **topk_accuracy(scores, test_labels), "n_train": len(train),
                              "n_test": len(test), "n_classes": n_classes, "image_size": size,
                              "seconds": round(time.perf_counter() - t, 2)}
    if task == "knn":
        result.update(k=k, temperature=temperature)
    else:
        result.update(chosen)
    return result


def dumps(result: dict[str, Any]) -> str:
    return json.dumps({k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v)
                       for k, v in result.items()})
