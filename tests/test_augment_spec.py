"""MultiCropSpec: the recipe both augmentation backends read."""

from __future__ import annotations

import dataclasses

import pytest

from streamssl.augment.spec import CropGroup, MultiCropSpec, encoded_bytes
from streamssl.config import AugmentConfig
from streamssl.stream.shards import Sample


def test_from_config_maps_every_field() -> None:
    cfg = AugmentConfig(n_views=(2, 3), sizes=(64, 32), min_scale=(0.3, 0.1), max_scale=(1.0, 0.3), flip_p=0.25,
                        jitter_strength=0.5, jitter_p=0.7, grayscale_p=0.1, blur_p=0.3, blur_sigma=(0.2, 1.5),
                        solarize_p=0.2, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    spec = MultiCropSpec.from_config(cfg)
    assert spec.groups == (CropGroup(2, 64, 0.3, 1.0), CropGroup(3, 32, 0.1, 0.3))
    assert (spec.flip_p, spec.jitter_p, spec.grayscale_p, spec.blur_p, spec.solarize_p) == (0.25, 0.7, 0.1, 0.3, 0.2)
    assert spec.jitter_strength == 0.5
    assert spec.blur_sigma == (0.2, 1.5)
    assert spec.mean == (0.1, 0.2, 0.3) and spec.std == (0.4, 0.5, 0.6)


def test_default_config_is_the_swav_recipe() -> None:
    spec = MultiCropSpec.from_config(AugmentConfig())
    assert spec.n_views == 8
    assert spec.view_sizes == (224, 224, 96, 96, 96, 96, 96, 96)
    assert spec == MultiCropSpec()


def test_views_are_ordered_group_by_group() -> None:
    spec = MultiCropSpec(groups=(CropGroup(1, 48, 0.5, 1.0), CropGroup(3, 16, 0.1, 0.5), CropGroup(2, 32, 0.2, 0.6)))
    assert spec.n_views == 6
    assert spec.view_sizes == (48, 16, 16, 16, 32, 32)
    assert [g.size for g in spec.view_groups] == list(spec.view_sizes)


def test_jitter_factors_follow_simclr() -> None:
    spec = MultiCropSpec(jitter_strength=0.5)
    assert spec.brightness == spec.contrast == spec.saturation == pytest.approx(0.4)
    assert spec.hue == pytest.approx(0.1)
    assert spec.hue_degrees == pytest.approx(36.0)
    assert spec.factor_range(0.4) == pytest.approx((0.6, 1.4))
    assert spec.factor_range(1.6) == pytest.approx((0.0, 2.6))  # a factor never goes negative
    strong = MultiCropSpec(jitter_strength=4.0)
    assert strong.hue == 0.5 and strong.hue_degrees == 180.0  # half a turn either way is every hue


def test_blur_kernel_is_odd_and_bounded() -> None:
    spec = MultiCropSpec(blur_sigma=(0.1, 2.0))
    for size in (8, 32, 96, 160, 224, 512):
        k = spec.blur_kernel(size)
        assert k % 2 == 1 and 3 <= k <= 13  # 13 = 2 * ceil(3 * 2.0) + 1
        assert k <= max(3, int(0.1 * size) + 1)
    assert spec.blur_kernel(96) == 9 and spec.blur_kernel(224) == 13
    assert MultiCropSpec(blur_sigma=(0.1, 0.5)).blur_kernel(224) == 5


def test_solarize_lut_inverts_above_threshold() -> None:
    lut = MultiCropSpec(solarize_threshold=128).solarize_lut()
    assert len(lut) == 256
    assert lut[0] == 0 and lut[127] == 127 and lut[128] == 127 and lut[255] == 0


def test_without_augmentation_keeps_crops_only() -> None:
    spec = MultiCropSpec().without_augmentation()
    assert (spec.flip_p, spec.jitter_p, spec.grayscale_p, spec.blur_p, spec.solarize_p) == (0, 0, 0, 0, 0)
    assert spec.groups == MultiCropSpec().groups


@pytest.mark.parametrize("change", [
    {"flip_p": 1.5}, {"jitter_p": -0.1}, {"blur_sigma": (0.0, 1.0)}, {"blur_sigma": (2.0, 1.0)},
    {"groups": ()}, {"std": (0.1, 0.0, 0.1)}, {"jitter_strength": -1.0}, {"aspect_ratio": (2.0, 1.0)},
])
def test_invalid_specs_raise(change: dict) -> None:
    with pytest.raises(ValueError):
        MultiCropSpec(**change)


def test_invalid_groups_raise() -> None:
    with pytest.raises(ValueError):
        CropGroup(0, 32, 0.1, 0.5)
    with pytest.raises(ValueError):
        CropGroup(2, 32, 0.6, 0.5)


def test_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        MultiCropSpec().flip_p = 0.0  # type: ignore[misc]


def test_encoded_bytes_takes_samples_and_bytes() -> None:
    assert encoded_bytes(b"abc") == b"abc"
    assert encoded_bytes(bytearray(b"abc")) == b"abc"
    assert encoded_bytes(Sample("k", b"xyz", "jpg", "u", 0)) == b"xyz"


BYOL_VIEWS = {"n_views": (1, 1), "sizes": (32, 32), "min_scale": (0.3, 0.3), "max_scale": (1.0, 1.0),
              "blur_p": (1.0, 0.1), "solarize_p": (0.0, 0.2)}


def test_probabilities_per_group_give_each_group_its_own_recipe() -> None:
    spec = MultiCropSpec.from_config(AugmentConfig(**BYOL_VIEWS, jitter_p=0.8))
    first, second = spec.groups
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert first.jitter_p is None and second.jitter_p is None  # one value: the spec's, for every group
    assert spec.for_group(first).blur_p == 1.0 and spec.for_group(first).solarize_p == 0.0
    assert spec.for_group(second).blur_p == 0.1 and spec.for_group(second).solarize_p == 0.2
    assert spec.for_group(first).jitter_p == spec.for_group(second).jitter_p == 0.8
    assert first != second  # two groups of the same size and scales stay two recipes
    plain = spec.without_augmentation()
    assert all(plain.for_group(g).blur_p == 0 and plain.for_group(g).solarize_p == 0 for g in plain.groups)


def test_one_probability_for_every_group_leaves_the_groups_plain() -> None:
    spec = MultiCropSpec.from_config(AugmentConfig(blur_p=(0.3,), solarize_p=0.1))
    assert all(g.blur_p is None and g.solarize_p is None for g in spec.groups)
    assert all(spec.for_group(g) is spec for g in spec.groups)
    assert (spec.blur_p, spec.solarize_p) == (0.3, 0.1)


def test_per_group_probabilities_need_one_entry_per_group() -> None:
    from streamssl.config import ConfigError, resolve

    with pytest.raises(ConfigError, match=r"augment\.blur_p: one value for every size group, or one per size"):
        AugmentConfig(blur_p=(0.5, 0.5, 0.5))
    cfg = resolve(None, overrides=["augment.blur_p=0.25", "augment.solarize_p=[0.0, 0.2]",
                                   "augment.n_views=[1, 1]", "augment.sizes=[32, 32]",
                                   "augment.min_scale=[0.3, 0.3]", "augment.max_scale=[1.0, 1.0]"])
    assert cfg.augment.blur_p == (0.25,) and cfg.augment.solarize_p == (0.0, 0.2)
    with pytest.raises(ConfigError, match=r"augment\.blur_p: must be <= 1"):
        resolve(None, overrides=["augment.blur_p=[0.5, 1.5]"])
    with pytest.raises(ValueError, match=r"CropGroup\.blur_p"):
        CropGroup(1, 32, 0.3, 1.0, blur_p=2.0)
