"""Evaluation: weighted kNN votes, the linear probe, dataset loaders (idx, folder, shards)."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from streamssl.learner.evaluate import (
    FASHION_MNIST_DIR,
    WEIGHT_DECAYS,
    evaluate,
    knn_classify,
    linear_probe,
    load_fashion_mnist,
    load_image_folder,
    load_splits,
    topk_accuracy,
)
from streamssl.stream.pack import pack_shards
from tests.synthetic import clustered_images


def test_knn_votes_are_weighted_by_similarity() -> None:
    # two far neighbours of class 0 against one very close neighbour of class 1
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]]), dim=1)
    labels = torch.tensor([1, 0, 0])
    query = F.normalize(torch.tensor([[1.0, 0.02]]), dim=1)
    votes = knn_classify(train, labels, query, 2, k=3, temperature=0.07)
    assert votes.argmax(dim=1).item() == 1
    # with a huge temperature every neighbour counts about the same: the majority (class 0) wins
    assert knn_classify(train, labels, query, 2, k=3, temperature=100.0).argmax(dim=1).item() == 0


def test_topk_accuracy() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert topk_accuracy(scores, labels, ks=(1, 2)) == pytest.approx({"top1": 1 / 3, "top2": 2 / 3})


def test_linear_probe_separates_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.randint(4, (400,), generator=g)
    feats = centres[labels] + torch.randn(400, 16, generator=g)
    chosen: dict[str, float] = {}
    scores = linear_probe(feats[:300], labels[:300], feats[300:], 4, chosen=chosen)
    assert topk_accuracy(scores, labels[300:])["top1"] > 0.95
    assert chosen["weight_decay"] in WEIGHT_DECAYS and chosen["holdout_top1"] > 0.9
    alone: dict[str, float] = {}
    linear_probe(feats[:300], labels[:300], feats[300:], 4, weight_decays=(1e-4,), chosen=alone)
    assert alone == {}  # one weight decay: nothing to choose


def test_linear_probe_regularisation_is_chosen_on_held_out_images() -> None:
    # Unbalanced classes (70/30) a line separates: a huge penalty leaves only the (free) bias, which says
    # "majority class" (~70%); a small one separates (~100%). The held-out tenth must tell them apart,
    # whatever the order of the grid.
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(600, generator=g) < 0.3).long()
    feats = torch.randn(600, 8, generator=g)
    feats[:, 0] += 3.0 * (2 * labels - 1)
    for grid in ((1e-4, 1e3), (1e3, 1e-4)):
        chosen: dict[str, float] = {}
        scores = linear_probe(feats[:500], labels[:500], feats[500:], 2, weight_decays=grid, chosen=chosen)
        assert chosen["weight_decay"] == 1e-4
        assert topk_accuracy(scores, labels[500:])["top1"] > 0.95
    crushed = linear_probe(feats[:500], labels[:500], feats[500:], 2, weight_decays=(1e3,))
    assert topk_accuracy(crushed, labels[500:])["top1"] < 0.85  # what a wrong choice would have scored


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    train, test = load_splits(f"fashion-mnist:{tmp_path}")
    assert len(train) == 12 and len(test) == 5 and train.n_classes == 10
    assert train.images[0].shape == (28, 28, 3) and list(test.labels) == [0, 1, 2, 3, 4]
    assert np.array_equal(train.images[3][..., 0], train.images[3][..., 2])  # grey expanded to RGB


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist() -> None:
    test = load_fashion_mnist(FASHION_MNIST_DIR, "test")
    assert len(test) == 10_000 and sorted(set(test.labels.tolist())) == list(range(10))


def clustered_folder(root: Path, n: int = 40) -> None:
    images, labels = clustered_images(n, 3, 24, torch.Generator().manual_seed(1))
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"class{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        array = (img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i}.png")


def test_folder_and_shards_give_the_same_data(tmp_path: Path) -> None:
    clustered_folder(tmp_path / "src")
    pack_shards(tmp_path / "src", str(tmp_path / "shards" / "s-%06d.tar"), per_shard=16, labels=True)
    from_folder = load_splits(str(tmp_path / "src"))
    from_shards = load_splits(str(tmp_path / "shards" / "s-{000000..000002}.tar"))
    for a, b in zip(from_folder, from_shards, strict=True):
        assert len(a) == len(b) and sorted(a.labels.tolist()) == sorted(b.labels.tolist())
    assert len(from_folder[0]) == 32 and len(from_folder[1]) == 8  # 80/20 hold-out


def test_image_folder_takes_the_stream_extensions_and_says_what_it_skipped(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    clustered_folder(tmp_path / "src", n=12)
    (tmp_path / "src" / "class0" / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "class0" / "old.bmp")  # the stream does not take BMP
    with caplog.at_level("WARNING"):
        data = load_image_folder(tmp_path / "src")
    assert len(data) == 12
    assert "2 file(s) skipped" in caplog.text and "1 .txt" in caplog.text and "1 .bmp" in caplog.text


def test_raw_pixel_knn_on_clustered_images(tmp_path: Path) -> None:
    clustered_folder(tmp_path / "src", n=120)
    train, test = load_splits(str(tmp_path / "src"))
    result = evaluate("knn", None, train, test, size=24, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert result["top1"] > 0.8 and result["n_train"] == 96 and result["n_test"] == 24
    assert result["k"] == 20 and result["temperature"] == 0.07


def test_image_bytes_decode_like_arrays() -> None:
    from streamssl.learner.evaluate import to_tensor

    array = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    torch.testing.assert_close(to_tensor(buf.getvalue(), 8, (0.5,) * 3, (0.2,) * 3),
                               to_tensor(array, 8, (0.5,) * 3, (0.2,) * 3))
