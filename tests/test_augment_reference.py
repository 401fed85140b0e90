"""The torchvision twin (augment/reference.py) and backend selection (augment/__init__.py)."""

from __future__ import annotations

import io
import logging
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import streamssl.augment as augment
from streamssl.augment import make_multicrop
from streamssl.augment.bench import synthetic_image
from streamssl.augment.reference import (
    MultiCropDataset,
    TorchvisionMultiCrop,
    collate_views,
    decode_rgb,
)
from streamssl.augment.spec import CropGroup, MultiCropSpec
from streamssl.config import AugmentConfig
from streamssl.stream.shards import Sample

SMALL = MultiCropSpec(groups=(CropGroup(2, 48, 0.3, 1.0), CropGroup(3, 24, 0.05, 0.3)))


def encode(pixels: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def jpegs(n: int, seed: int = 0, size: tuple[int, int] = (120, 90)) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [encode(synthetic_image(rng, *size)) for _ in range(n)]


def truncated(jpeg: bytes) -> bytes:
    return jpeg[: len(jpeg) // 2]


def corrupt_huffman(jpeg: bytes) -> bytes:
    """A JPEG whose header parses (PIL opens it, its size is known) but whose Huffman table is bogus."""
    at = jpeg.find(b"\xff\xc4")
    broken = bytearray(jpeg)
    broken[at + 5:at + 21] = bytes([255] * 16)
    return bytes(broken)


def transcoded_16bit(gray: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG of ``gray`` (uint8, H x W), transcoded to 8-bit RGB as samples.py does."""
    wide = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 257).save(wide, format="PNG")
    with Image.open(io.BytesIO(wide.getvalue())) as image:
        assert image.mode.startswith("I")
        eight = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
    return encode(np.dstack([eight] * 3), "PNG")


def unnormalise(view: torch.Tensor, spec: MultiCropSpec) -> torch.Tensor:
    """(B, 3, S, S) normalised -> 0-255 scale."""
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (view * std + mean) * 255


def test_views_have_spec_shapes_and_order() -> None:
    images = jpegs(5)
    views, kept = TorchvisionMultiCrop(SMALL, 8)(images)
    assert kept == [0, 1, 2, 3, 4]
    assert [tuple(v.shape) for v in views] == [(5, 3, s, s) for s in SMALL.view_sizes]
    assert all(v.dtype == torch.float32 for v in views)


def test_constant_image_without_augmentation_is_exactly_normalised() -> None:
    colour = np.array([200, 100, 30], dtype=np.uint8)
    image = encode(np.broadcast_to(colour, (64, 80, 3)).copy(), "PNG")
    spec = SMALL.without_augmentation()
    views, _ = TorchvisionMultiCrop(spec, 2)([image])
    expected = (torch.tensor(colour / 255.0) - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    for view in views:
        assert torch.allclose(view[0].mean(dim=(1, 2)), expected.float(), atol=1e-3)
        assert view.std(dim=(2, 3)).max() < 1e-3


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16->RGB"])
def test_other_modes_decode_to_rgb(mode: str) -> None:
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 255, (40, 50), dtype=np.uint8)
    if mode == "L":
        data = encode(gray, "PNG")
    elif mode == "RGBA":
        data = encode(np.dstack([gray, gray, gray, np.full_like(gray, 128)]), "PNG")
    else:  # what samples.py hands on for a 16-bit PNG: transcoded to an 8-bit RGB PNG
        data = transcoded_16bit(gray)
    decoded = decode_rgb(data)
    assert decoded is not None and decoded.shape == (3, 40, 50) and decoded.dtype == torch.uint8
    assert torch.equal(decoded[0], decoded[1]) and torch.equal(decoded[1], decoded[2])
    views, kept = TorchvisionMultiCrop(SMALL.without_augmentation(), 1)([data])
    assert kept == [0] and views[0].shape == (1, 3, 48, 48)
    raw = unnormalise(views[0], SMALL)
    assert (raw[:, 0] - raw[:, 1]).abs().max() < 0.05  # gray stays gray: channels equal before normalising


def test_bad_inputs_are_dropped_and_counted() -> None:
    good = jpegs(6)
    batch: list = list(good)
    batch[1] = truncated(good[1])
    batch[3] = corrupt_huffman(good[3])
    batch[4] = b"definitely not an image"
    batch[5] = Sample("k5", good[5], "jpg", "shard", 5)
    bad: list[str] = []
    views, kept = TorchvisionMultiCrop(SMALL, 8, on_bad=bad.append)(batch)
    assert kept == [0, 2, 5]
    assert bad == ["decode_error"] * 3
    assert all(v.shape[0] == 3 for v in views)


def test_all_bad_batch_gives_empty_views() -> None:
    bad: list[str] = []
    views, kept = TorchvisionMultiCrop(SMALL, 4, on_bad=bad.append)([b"", b"xx", truncated(jpegs(1)[0])])
    assert kept == [] and len(bad) == 3
    assert [tuple(v.shape) for v in views] == [(0, 3, s, s) for s in SMALL.view_sizes]


def test_seeded_and_leaves_global_rng_alone() -> None:
    images = jpegs(3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = TorchvisionMultiCrop(SMALL, 4, seed=7)(images)
    b, _ = TorchvisionMultiCrop(SMALL, 4, seed=7)(images)
    c, _ = TorchvisionMultiCrop(SMALL, 4, seed=8)(images)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_colour_and_blur_change_the_views() -> None:
    image = jpegs(1)
    plain_spec = SMALL.without_augmentation()
    plain, _ = TorchvisionMultiCrop(plain_spec, 1, seed=0)(image)
    again, _ = TorchvisionMultiCrop(plain_spec, 1, seed=0)(image)
    jittered, _ = TorchvisionMultiCrop(replace(plain_spec, jitter_p=1.0, blur_p=1.0), 1, seed=0)(image)
    # The first view's crop is the first draw of the seeded stream in all three: only colour/blur differ.
    assert torch.equal(plain[0], again[0])
    assert (plain[0] - jittered[0]).abs().mean() > 0.05


def asymmetric_spec() -> MultiCropSpec:
    """BYOL-style views: blur and solarisation on the first view's group only, nothing else anywhere."""
    groups = (CropGroup(1, 32, 1.0, 1.0, blur_p=1.0, solarize_p=1.0), CropGroup(1, 32, 1.0, 1.0))
    return MultiCropSpec(groups=groups, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0,
                         blur_sigma=(1.5, 2.0))


def check_asymmetric_views(views: list[torch.Tensor], spec: MultiCropSpec) -> None:
    """The two views of ``asymmetric_spec`` on [flat (200, 100, 30), noise]: the first solarised and blurred,
    the second neither."""
    colour = torch.tensor([200.0, 100.0, 30.0])
    first, second = (unnormalise(v, spec) for v in views)
    assert torch.allclose(first[0].mean(dim=(1, 2)), torch.where(colour >= 128, 255 - colour, colour), atol=0.5)
    assert torch.allclose(second[0].mean(dim=(1, 2)), colour, atol=0.5)
    assert first[1].diff(dim=-1).abs().mean() < 0.5 * second[1].diff(dim=-1).abs().mean()


def asymmetric_images() -> list[bytes]:
    colour = np.array([200, 100, 30], dtype=np.uint8)
    noise = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return [encode(np.broadcast_to(colour, (32, 32, 3)).copy(), "PNG"), encode(noise, "PNG")]


def test_each_view_group_gets_its_own_probabilities() -> None:
    spec = asymmetric_spec()
    views, kept = TorchvisionMultiCrop(spec, 2, seed=0)(asymmetric_images())
    assert kept == [0, 1]
    check_asymmetric_views(views, spec)


def test_dataloader_with_workers_collates_and_reports_drops() -> None:
    items = jpegs(7)
    items[2] = truncated(items[2])
    loader = torch.utils.data.DataLoader(MultiCropDataset(items, SMALL), batch_size=4, num_workers=2,
                                         collate_fn=collate_views, timeout=60)
    kept_all, dropped_all = [], []
    for views, kept, dropped in loader:
        assert [tuple(v.shape) for v in views] == [(len(kept), 3, s, s) for s in SMALL.view_sizes]
        kept_all += kept
        dropped_all += dropped
    assert sorted(kept_all) == [0, 1, 3, 4, 5, 6] and dropped_all == [2]


def test_collate_of_only_bad_items() -> None:
    assert collate_views([(0, None), (1, None)]) == ([], [], [0, 1])


def test_make_multicrop_torchvision() -> None:
    cfg = AugmentConfig(backend="torchvision", n_views=(1, 2), sizes=(32, 16), min_scale=(0.5, 0.1),
                        max_scale=(1.0, 0.5))
    multicrop = make_multicrop(cfg, 4)
    assert isinstance(multicrop, TorchvisionMultiCrop)
    views, kept = multicrop(jpegs(2))
    assert kept == [0, 1] and [v.shape[-1] for v in views] == [32, 16, 16]


def test_auto_falls_back_to_torchvision_once(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` raise ImportError
    monkeypatch.setattr(augment, "_fallback_logged", False)
    caplog.set_level(logging.INFO, logger="streamssl.augment")
    first = make_multicrop(AugmentConfig(backend="auto"), 4)
    second = make_multicrop(AugmentConfig(backend="auto"), 4)
    assert isinstance(first, TorchvisionMultiCrop) and isinstance(second, TorchvisionMultiCrop)
    said = [r for r in caplog.records if r.name == "streamssl.augment" and "torchvision" in r.getMessage()]
    assert len(said) == 1


def test_dali_backend_without_dali_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(RuntimeError, match=r"nvidia\.dali.*torchvision"):
        make_multicrop(AugmentConfig(backend="dali"), 4)


def test_bench_torchvision_on_shards(tmp_path) -> None:
    import json

    from streamssl.augment.bench import bench_augment, write_shards

    write_shards(tmp_path, n_images=10, per_shard=5)
    cfg = AugmentConfig(n_views=(1, 2), sizes=(32, 16), min_scale=(0.5, 0.1), max_scale=(1.0, 0.5))
    result = bench_augment(str(tmp_path / "*.tar"), "torchvision", 2, cfg, batch_size=4)  # a glob, as run takes
    assert json.loads(json.dumps(result)) == result
    assert result["backend"] == "torchvision" and result["batches"] == 2 and result["batch_size"] == 4
    # every image the workers made is on the clock: 2 batches of 4, no untimed warm-up batch beside them
    assert result["images"] == 8 and result["bad"] == {}
    assert result["images_per_s"] > 0 and result["views_per_s"] == pytest.approx(3 * result["images_per_s"], 0.01)


def test_the_twin_never_touches_the_global_rng_from_its_thread() -> None:
    """The feeder thread runs the twin beside training: the learner's draws from the global RNG must be the
    ones it would make alone."""
    import threading

    images = jpegs(8)
    twin = TorchvisionMultiCrop(SMALL, 8, seed=3)
    torch.manual_seed(123)
    expected = torch.rand(200_000).tolist()
    torch.manual_seed(123)
    worker = threading.Thread(target=lambda: [twin(images) for _ in range(3)])
    got: list[float] = []
    worker.start()
    while worker.is_alive() and len(got) < len(expected):
        got.append(float(torch.rand(())))
    worker.join()
    assert len(got) > 10 and got == expected[:len(got)]


def test_worker_processes_give_the_views_of_the_calling_thread() -> None:
    """Spread over 2 spawned workers the twin returns the same views, in the same order, and drops and
    counts the same bad inputs: the views depend on the seed, never on where they were made."""
    good = jpegs(7, seed=4)
    batch = [good[0], truncated(good[1]), *good[2:5], b"not an image", *good[5:]]
    bad_here: list[str] = []
    bad_there: list[str] = []
    here, kept_here = TorchvisionMultiCrop(SMALL, 8, seed=5, on_bad=bad_here.append)(batch)
    twin = TorchvisionMultiCrop(SMALL, 8, seed=5, on_bad=bad_there.append, workers=2)
    try:
        there, kept_there = twin(batch)
        again, _ = twin(good)
    finally:
        twin.close()
    assert kept_here == kept_there == [0, 2, 3, 4, 6, 7] and bad_here == bad_there == ["decode_error"] * 2
    for a, b in zip(here, there, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert [v.shape[0] for v in again] == [7] * len(SMALL.view_sizes)  # the pool stays up between calls
    assert twin._pool is None  # closed


def test_on_a_gpu_run_the_twin_gets_worker_processes() -> None:
    cfg = AugmentConfig(backend="torchvision", n_threads=3)
    on_cpu = make_multicrop(cfg, 4, device="cpu")
    on_gpu = make_multicrop(cfg, 4, device="cuda:0")  # no GPU needed to build it
    try:
        assert on_cpu.workers == 0 and on_gpu.workers == 3 and on_gpu.device == torch.device("cuda", 0)
    finally:
        on_gpu.close()
