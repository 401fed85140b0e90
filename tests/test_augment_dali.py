"""The DALI multi-crop (augment/dali.py): shapes, values against the torchvision twin, bad-input recovery."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from streamssl.augment import make_multicrop
from streamssl.augment.bench import synthetic_image
from streamssl.augment.reference import TorchvisionMultiCrop
from streamssl.augment.spec import CropGroup, MultiCropSpec
from streamssl.config import AugmentConfig
from streamssl.stream.shards import Sample
from tests.test_augment_reference import (
    asymmetric_images,
    asymmetric_spec,
    check_asymmetric_views,
    corrupt_huffman,
    truncated,
)

pytestmark = pytest.mark.dali

SMALL = MultiCropSpec(groups=(CropGroup(2, 48, 0.3, 1.0), CropGroup(3, 24, 0.05, 0.3)))
STATS = MultiCropSpec(groups=(CropGroup(2, 96, 0.14, 1.0), CropGroup(4, 48, 0.05, 0.14)))


def encode(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def jpegs(n: int, seed: int = 0, size: tuple[int, int] = (120, 90), tint: bool = False) -> list[bytes]:
    """Natural-ish JPEGs; ``tint`` gives the three channels clearly different statistics."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pixels = synthetic_image(rng, *size).astype(np.float32)
        if tint:
            pixels = pixels * np.array([0.9, 0.6, 0.3]) + np.array([20.0, 30.0, 10.0])
        out.append(encode(np.clip(pixels, 0, 255).astype(np.uint8)))
    return out


def scribbled(jpeg: bytes) -> bytes:
    """Corrupt entropy-coded data after an intact header: decoders may return artefacts or fail."""
    start = jpeg.find(b"\xff\xda") + 20
    rng = np.random.default_rng(3)
    broken = bytearray(jpeg)
    for at in rng.integers(start, len(jpeg) - 2, 200):
        broken[at] = int(rng.integers(0, 256))
    return bytes(broken)


def unnormalise(view: torch.Tensor, spec: MultiCropSpec) -> torch.Tensor:
    """(B, 3, S, S) normalised -> 0-255 scale."""
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (view * std + mean) * 255


def channel_stats(views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over every pixel of every view: two (3,) tensors."""
    pixels = torch.cat([v.permute(1, 0, 2, 3).reshape(3, -1) for v in views], dim=1)  # (3, N)
    return pixels.mean(dim=1), pixels.std(dim=1)


@pytest.fixture(scope="module")
def dali_small():  # one pipeline for the tests that only read from it
    from streamssl.augment.dali import DaliMultiCrop

    return DaliMultiCrop(SMALL, 8, seed=0)


def test_shapes_match_the_twin(dali_small) -> None:
    images = jpegs(6)
    views, kept = dali_small(images)
    twin_views, twin_kept = TorchvisionMultiCrop(SMALL, 8)(images)
    assert kept == twin_kept == list(range(6))
    assert len(views) == len(twin_views) == SMALL.n_views
    assert [v.shape for v in views] == [v.shape for v in twin_views]
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in views)
    assert all(torch.isfinite(v).all() for v in views)


def test_default_swav_spec_shapes() -> None:
    from streamssl.augment.dali import DaliMultiCrop

    views, kept = DaliMultiCrop(MultiCropSpec(), 4)(jpegs(3, size=(320, 240)))
    assert kept == [0, 1, 2]
    assert [tuple(v.shape) for v in views] == [(3, 3, 224, 224)] * 2 + [(3, 3, 96, 96)] * 6


def test_constant_image_without_augmentation_is_exactly_normalised() -> None:
    from streamssl.augment.dali import DaliMultiCrop

    colour = np.array([200, 100, 30], dtype=np.uint8)
    image = encode(np.broadcast_to(colour, (64, 80, 3)).copy(), "PNG")
    spec = SMALL.without_augmentation()
    views, _ = DaliMultiCrop(spec, 2)([image, image])
    twin, _ = TorchvisionMultiCrop(spec, 2)([image, image])
    expected = ((torch.tensor(colour / 255.0) - torch.tensor(spec.mean)) / torch.tensor(spec.std)).float()
    for view, twin_view in zip(views, twin, strict=True):
        assert torch.allclose(view.mean(dim=(0, 2, 3)), expected, atol=1e-3)
        assert torch.allclose(view, twin_view, atol=1e-3)


@pytest.mark.parametrize("solarize_p", [0.0, 1.0])
def test_blur_is_spatial_and_solarize_inverts(solarize_p: float) -> None:
    from streamssl.augment.dali import DaliMultiCrop

    colour = np.array([200, 100, 30], dtype=np.uint8)
    flat = encode(np.broadcast_to(colour, (64, 80, 3)).copy(), "PNG")
    spec = replace(SMALL.without_augmentation(), blur_p=1.0, solarize_p=solarize_p)
    views, _ = DaliMultiCrop(spec, 2)([flat, flat])
    # A blur across channels would mix 200, 100 and 30; a spatial blur leaves a flat image flat.
    expected = np.where(colour >= 128, 255 - colour, colour) if solarize_p else colour
    for view in views:
        assert torch.allclose(unnormalise(view, spec).mean(dim=(0, 2, 3)), torch.tensor(expected).float(), atol=0.5)
        assert unnormalise(view, spec).std(dim=(2, 3)).max() < 0.5
    # On a textured image the blur smooths: neighbouring pixels differ less than without it.
    noise = np.random.default_rng(4).integers(0, 256, (60, 60, 3), dtype=np.uint8)
    textured = [encode(noise, "PNG")] * 2
    plain = SMALL.without_augmentation()
    sharp = DaliMultiCrop(plain, 2, seed=3)(textured)[0][0]
    blurred = DaliMultiCrop(replace(plain, blur_p=1.0, blur_sigma=(1.5, 2.0)), 2, seed=3)(textured)[0][0]
    assert blurred.diff(dim=-1).abs().mean() < 0.5 * sharp.diff(dim=-1).abs().mean()


def test_each_view_group_gets_its_own_probabilities() -> None:
    from streamssl.augment.dali import DaliMultiCrop

    spec = asymmetric_spec()
    views, kept = DaliMultiCrop(spec, 2, seed=0)(asymmetric_images())
    assert kept == [0, 1]
    check_asymmetric_views(views, spec)


@pytest.mark.parametrize("augmented", [False, True])
def test_value_statistics_match_the_twin(augmented: bool) -> None:
    from streamssl.augment.dali import DaliMultiCrop

    images = jpegs(32, tint=True)
    spec = STATS if augmented else STATS.without_augmentation()
    dali_mean, dali_std = channel_stats(DaliMultiCrop(spec, 32, seed=1)(images)[0])
    twin_mean, twin_std = channel_stats(TorchvisionMultiCrop(spec, 32, seed=1)(images)[0])
    # Off: only the random crops differ. On: DALI's hue is a rotation about the gray axis where torchvision
    # shifts HSV hue, and torchvision shuffles the jitter order, so per-channel spreads differ a little.
    mean_tol, std_rel = (0.08, 0.06) if not augmented else (0.25, 0.3)
    assert (dali_mean - twin_mean).abs().max() < mean_tol, (dali_mean, twin_mean)
    assert ((dali_std - twin_std).abs() / twin_std).max() < std_rel, (dali_std, twin_std)
    if not augmented:  # the tint survives: channel order and normalisation are right
        assert dali_mean[0] > dali_mean[1] > dali_mean[2]


def test_hue_jitter_is_in_degrees() -> None:
    from streamssl.augment.dali import DaliMultiCrop

    red = encode(np.broadcast_to(np.array([220, 20, 20], np.uint8), (48, 48, 3)).copy(), "PNG")
    spec = replace(SMALL.without_augmentation(), jitter_p=1.0)
    gaps = []
    for backend in (DaliMultiCrop(spec, 16, seed=0), TorchvisionMultiCrop(spec, 16, seed=0)):
        raw = unnormalise(backend([red] * 16)[0][0], spec)  # (16, 3, 48, 48), 0-255
        # Brightness, contrast and saturation keep G == B on pure red; only a hue shift separates them.
        gaps.append((raw[:, 1] - raw[:, 2]).abs().mean().item())
    assert gaps[0] > 15 and gaps[1] > 15, gaps
    assert 0.33 < gaps[0] / gaps[1] < 3, gaps


def test_view_draws_follow_the_spec() -> None:
    from streamssl.augment.dali_graph import view_draws

    spec = MultiCropSpec(jitter_strength=0.5, jitter_p=0.7, grayscale_p=0.25, blur_p=0.4, blur_sigma=(0.1, 2.0))
    big, small = spec.groups
    n = 20000
    draws = view_draws(spec, big, np.random.default_rng(0), n)
    jittered = draws["hue"] != 0
    assert abs(jittered.mean() - 0.7) < 0.02
    for name, f in (("brightness", spec.brightness), ("contrast", spec.contrast)):
        lo, hi = spec.factor_range(f)
        assert lo <= draws[name][jittered].min() and draws[name][jittered].max() <= hi
        assert (draws[name][~jittered] == 1).all()  # no jitter: the identity
    assert (np.abs(draws["hue"]) <= spec.hue_degrees).all()
    gray = draws["saturation"] == 0
    assert abs(gray.mean() - 0.25) < 0.02 and (draws["saturation"][~jittered & ~gray] == 1).all()
    blurred = draws["blur"]
    assert abs(blurred.mean() - 0.4) < 0.02
    k = spec.blur_kernel(big.size)
    kernels = draws["blur_h"][:, 0, :]  # (n, k)
    assert draws["blur_h"].shape == (n, 1, k) and draws["blur_v"].shape == (n, k, 1)
    assert np.array_equal(draws["blur_v"][:, :, 0], kernels)
    assert np.allclose(kernels.sum(axis=1), 1, atol=1e-5) and np.allclose(kernels, kernels[:, ::-1])
    identity = np.zeros(k, np.float32)
    identity[k // 2] = 1
    assert (kernels[~blurred] == identity).all() and not (kernels[blurred] == identity).all(axis=1).any()
    spread = np.sqrt((kernels[blurred] * (np.arange(k) - k // 2) ** 2).sum(axis=1))  # std of each kernel
    assert spread.min() < 0.2 and 1.7 < spread.max() < 2.0  # sigma in (0.1, 2.0), the window trims the tails
    assert view_draws(spec, small, np.random.default_rng(0), 5)["blur_h"].shape == (5, 1, spec.blur_kernel(small.size))
    plain = view_draws(spec.without_augmentation(), big, np.random.default_rng(0), 5)
    assert plain == {}  # nothing to draw: the graph has no colour or blur operators either


def test_blur_matches_torchvision() -> None:
    """Same crops with and without blur (the blur draws no DALI randomness): the blurred view is
    torchvision's GaussianBlur of the plain one, with the spec's window and reflected borders."""
    from torchvision.transforms.v2 import functional as tvf

    from streamssl.augment.dali import DaliMultiCrop

    noise = np.random.default_rng(4).integers(0, 256, (60, 70, 3), dtype=np.uint8)
    images = [encode(noise, "PNG")] * 3
    plain = SMALL.without_augmentation()
    sigma = 1.3
    sharp = DaliMultiCrop(plain, 3, seed=3)(images)[0]
    blurred = DaliMultiCrop(replace(plain, blur_p=1.0, blur_sigma=(sigma, sigma)), 3, seed=3)(images)[0]
    for view, group_view, size in zip(sharp, blurred, SMALL.view_sizes, strict=True):
        expected = tvf.gaussian_blur(view, kernel_size=plain.blur_kernel(size), sigma=sigma)
        assert torch.allclose(group_view, expected, atol=1e-4), (group_view - expected).abs().max()


def test_blur_coins_all_down_and_single_samples() -> None:
    """A conditional whose branch gets no sample (every coin down) or the whole batch still runs."""
    from streamssl.augment.dali import DaliMultiCrop

    spec = replace(SMALL.without_augmentation(), blur_p=0.5, jitter_p=0.5)
    multicrop = DaliMultiCrop(spec, 1, seed=0)
    images = jpegs(1)
    sums = [multicrop(images)[0][0].sum().item() for _ in range(12)]
    assert all(np.isfinite(sums)) and len(set(np.round(sums, 3))) > 1


def test_grayscale_makes_channels_equal() -> None:
    from streamssl.augment.dali import DaliMultiCrop

    spec = replace(SMALL.without_augmentation(), grayscale_p=1.0)
    views, _ = DaliMultiCrop(spec, 4)(jpegs(4, tint=True))
    raw = unnormalise(views[0], spec)
    # One grey level per pixel in all three channels, up to DALI's rounding in its colour-space step.
    assert (raw[:, 0] - raw[:, 1]).abs().max() <= 1.01 and (raw[:, 1] - raw[:, 2]).abs().max() <= 1.01


@pytest.mark.parametrize("mode", ["L", "RGBA", "16-bit transcoded", "16-bit raw"])
def test_other_modes_decode_to_rgb(mode: str, dali_small) -> None:
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 255, (40, 50), dtype=np.uint8)
    if mode == "L":
        data = encode(gray, "PNG")
    elif mode == "RGBA":
        data = encode(np.dstack([gray, gray, gray, np.full_like(gray, 128)]), "PNG")
    elif mode == "16-bit raw":
        data = encode(gray.astype(np.uint16) * 257, "PNG")
    else:  # what samples.py hands on: the 16-bit image transcoded to an 8-bit RGB PNG
        data = encode(np.dstack([gray] * 3), "PNG")
    views, kept = dali_small([data])
    assert kept == [0] and [v.shape[1] for v in views] == [3] * SMALL.n_views
    if mode != "16-bit raw":
        raw = unnormalise(views[0], SMALL)
        assert (raw[:, 0] - raw[:, 1]).abs().max() < 1.0  # gray replicated to R, G and B


def test_bad_inputs_rebuild_and_drop_exactly_the_offenders() -> None:
    from streamssl.augment.dali import DaliMultiCrop

    # Each good image is one flat colour, so the surviving views tell which inputs they came from.
    levels = [10 + 30 * i for i in range(8)]
    good = [encode(np.full((60, 80, 3), level, np.uint8), "PNG") for level in levels]
    natural = jpegs(3)
    batch: list = list(good)
    batch[1] = truncated(natural[0])
    batch[4] = corrupt_huffman(natural[1])
    batch[6] = b"definitely not an image"
    batch[7] = Sample("k7", good[7], "png", "shard", 7)
    bad: list[str] = []
    spec = SMALL.without_augmentation()
    multicrop = DaliMultiCrop(spec, 8, on_bad=bad.append)
    views, kept = multicrop(batch)
    assert kept == [0, 2, 3, 5, 7]
    assert bad == ["decode_error"] * 3
    assert multicrop.n_rebuilds == 1
    for view in views:
        assert view.shape[0] == 5
        seen = unnormalise(view, spec).mean(dim=(1, 2, 3))  # (5,) grey level of each kept view
        assert torch.allclose(seen, torch.tensor([float(levels[i]) for i in kept]), atol=1.0)
    # The rebuilt pipeline goes on: the next (clean) batch comes out whole, with no new rebuild.
    views, kept = multicrop(good)
    assert kept == list(range(8)) and multicrop.n_rebuilds == 1 and len(bad) == 3


def test_offender_the_decode_check_misses_is_dropped_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamssl.augment.dali import DaliMultiCrop

    bad: list[str] = []
    multicrop = DaliMultiCrop(SMALL, 4, on_bad=bad.append)
    monkeypatch.setattr(multicrop, "_decodes", lambda array: True)  # a check that passes everything
    good = jpegs(3)
    views, kept = multicrop([good[0], truncated(good[1]), good[2]])
    # batch fails -> rebuild; nothing dropped, the rerun fails -> rebuild; one by one: the offender fails.
    assert kept == [0, 2] and bad == ["augment_error"] and multicrop.n_rebuilds == 3
    assert [tuple(v.shape) for v in views] == [(2, 3, s, s) for s in SMALL.view_sizes]


def test_whole_bad_batch_gives_empty_views(dali_small) -> None:
    bad: list[str] = []
    dali_small.on_bad = bad.append
    try:
        views, kept = dali_small([truncated(jpegs(1)[0]), b"nope", b""])
    finally:
        dali_small.on_bad = None
    assert kept == [] and bad == ["decode_error"] * 3
    assert [tuple(v.shape) for v in views] == [(0, 3, s, s) for s in SMALL.view_sizes]
    assert dali_small(jpegs(2))[1] == [0, 1]


def test_scribbled_entropy_data_never_crashes(dali_small) -> None:
    good = jpegs(3)
    views, kept = dali_small([good[0], scribbled(good[1]), good[2]])
    assert kept[0] == 0 and kept[-1] == 2 and len(kept) in (2, 3)  # decoded with artefacts, or dropped
    assert all(v.shape[0] == len(kept) for v in views)


@pytest.mark.parametrize("n", [1, 5, 8, 19])
def test_variable_batch_sizes(n: int, dali_small) -> None:
    views, kept = dali_small(jpegs(n, seed=n))
    assert kept == list(range(n))  # 19 > batch_size 8: run in chunks, indices stay global
    assert [tuple(v.shape) for v in views] == [(n, 3, s, s) for s in SMALL.view_sizes]


def test_views_survive_later_calls(dali_small) -> None:
    first, _ = dali_small(jpegs(4, seed=10))
    snapshot = [v.clone() for v in first]
    for seed in range(11, 14):
        dali_small(jpegs(4, seed=seed))
    assert all(torch.equal(a, b) for a, b in zip(first, snapshot, strict=True))  # no aliasing of DALI buffers


def test_seed_makes_runs_repeatable() -> None:
    from streamssl.augment.dali import DaliMultiCrop

    images = jpegs(4)
    a, _ = DaliMultiCrop(SMALL, 4, seed=5)(images)
    b, _ = DaliMultiCrop(SMALL, 4, seed=5)(images)
    c, _ = DaliMultiCrop(SMALL, 4, seed=6)(images)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_fused_decode_crop_path() -> None:
    from streamssl.augment.dali import DaliMultiCrop

    bad: list[str] = []
    multicrop = DaliMultiCrop(SMALL, 4, fused_decode=True, on_bad=bad.append)
    good = jpegs(3)
    views, kept = multicrop([good[0], truncated(good[1]), good[2]])
    assert kept == [0, 2] and bad == ["decode_error"]
    assert [tuple(v.shape) for v in views] == [(2, 3, s, s) for s in SMALL.view_sizes]


def test_make_multicrop_picks_dali() -> None:
    from streamssl.augment.dali import DaliMultiCrop

    for backend in ("dali", "auto"):
        cfg = AugmentConfig(backend=backend, n_views=(1, 2), sizes=(32, 16), min_scale=(0.5, 0.1),
                            max_scale=(1.0, 0.5))
        multicrop = make_multicrop(cfg, 4)
        assert isinstance(multicrop, DaliMultiCrop)
        assert [v.shape[-1] for v in multicrop(jpegs(2))[0]] == [32, 16, 16]


@pytest.mark.gpu
def test_gpu_pipeline_returns_cuda_views() -> None:
    from streamssl.augment.dali import DaliMultiCrop

    bad: list[str] = []
    multicrop = DaliMultiCrop(SMALL, 8, device="cuda", on_bad=bad.append)
    good = jpegs(4)
    views, kept = multicrop([good[0], truncated(good[1]), good[2], good[3]])
    # nvJPEG may decode a JPEG cut in half (the missing rows come out grey) where the CPU decoder refuses
    # it: either way the good images are kept and the batch never fails.
    assert (kept, bad) in (([0, 2, 3], ["decode_error"]), ([0, 1, 2, 3], []))
    assert all(v.is_cuda and v.shape[0] == len(kept) for v in views)
    cpu_mean, _ = channel_stats([v.cpu() for v in DaliMultiCrop(SMALL.without_augmentation(), 8)(good)[0]])
    gpu_mean, _ = channel_stats([v.cpu() for v in DaliMultiCrop(SMALL.without_augmentation(), 8,
                                                                device="cuda")(good)[0]])
    assert (cpu_mean - gpu_mean).abs().max() < 0.15


def test_decode_checker_runs_on_the_cpu_for_a_gpu_pipeline() -> None:
    """The checker that finds the bad images after a failed batch is a CPU pipeline whatever the main
    pipeline's device: it is rebuilt per bad image, which must not cost a GPU context each time."""
    from streamssl.augment.dali import DaliMultiCrop

    multicrop = DaliMultiCrop(SMALL, 4)
    multicrop.device = torch.device("cuda", 1)  # as a GPU multi-crop would be; no GPU needed to check
    good = jpegs(1)[0]
    assert multicrop._decodes(np.frombuffer(good, dtype=np.uint8))
    assert not multicrop._decodes(np.frombuffer(truncated(good), dtype=np.uint8))
    assert multicrop._decodes(np.frombuffer(good, dtype=np.uint8))  # rebuilt after the failure


def test_gpu_graph_is_well_formed_without_a_gpu() -> None:
    """The GPU graph is defined (operator devices, CPU-only named arguments) even where it cannot run."""
    from nvidia.dali import pipeline_def

    from streamssl.augment.dali_graph import define_graph

    spec = replace(MultiCropSpec(), solarize_p=0.2)
    devices: list[str] = []

    @pipeline_def(batch_size=2, num_threads=1, device_id=0, enable_conditionals=True, exec_dynamic=True)
    def graph():
        views = define_graph(spec, gpu=True, fused_decode=False)
        devices.extend(view.device for view in views)
        return views

    try:
        graph().build()
    except RuntimeError as exc:  # no CUDA here: the graph was defined before DALI looked for a device
        if torch.cuda.is_available():
            raise
        assert "CUDA" in str(exc)
    assert devices == ["gpu"] * spec.n_views


def test_bench_dali_on_shards(tmp_path) -> None:
    import webdataset as wds

    from streamssl.augment.bench import bench_augment, write_shards

    write_shards(tmp_path, n_images=10, per_shard=5)
    with wds.TarWriter(str(tmp_path / "shard-000002.tar")) as sink:  # a shard with one non-image member
        sink.write({"__key__": "junk", "jpg": b"this is text, not a JPEG"})
        sink.write({"__key__": "fine", "jpg": jpegs(1)[0]})
    cfg = AugmentConfig(n_views=(1, 2), sizes=(32, 16), min_scale=(0.5, 0.1), max_scale=(1.0, 0.5))
    result = bench_augment(str(tmp_path / "shard-{000000..000002}.tar"), "dali", 2, cfg, batch_size=4)
    assert result["backend"] == "dali" and result["images"] == 8
    assert sum(result["bad"].values()) == 1  # the junk member, counted by the reading stage
    assert result["views_per_s"] == pytest.approx(3 * result["images_per_s"], 0.01)
