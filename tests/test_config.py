"""Configuration layers: defaults < profile < environment < --set, with one clear error per bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamssl.config import Config, ConfigError, find_profile, resolve

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


@pytest.mark.parametrize("name", sorted(p.stem for p in PIPELINES.glob("*.toml")))
def test_shipped_profiles_resolve(name: str) -> None:
    cfg = resolve(name, environ={})
    assert isinstance(cfg, Config)


def test_paper_recipe_profile() -> None:
    cfg = resolve("gpu-resnet50", environ={})
    assert (cfg.model.arch, cfg.augment.n_views, cfg.augment.sizes) == ("resnet50", (2, 6), (224, 96))
    assert (cfg.model.n_prototypes, cfg.learner.epsilon, cfg.learner.sinkhorn_iters) == (3000, 0.05, 3)
    assert (cfg.learner.temperature, cfg.learner.queue_length, cfg.learner.optimizer) == (0.1, 3840, "lars")
    assert cfg.learner.bf16 and cfg.model.channels_last
    # the authors' batch-256 scripts: no warmup, prototypes frozen one ImageNet epoch (5005 iterations at
    # 256), the queue from epoch 15
    assert (cfg.learner.batch_size, cfg.learner.base_lr, cfg.learner.warmup_steps) == (256, 0.6, 0)
    assert (cfg.learner.freeze_prototypes_steps, cfg.learner.queue_start_step) == (5005, 75075)


def test_layers_apply_in_order(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text('[learner]\nbase_lr = 0.5\nbatch_size = 32\ntemperature = 0.2\n[model]\narch = "resnet18"\n')
    env = {"STREAMSSL_LEARNER_BASE_LR": "0.25", "STREAMSSL_LEARNER_BATCH_SIZE": "16"}
    cfg = resolve(profile, environ=env, overrides=["learner.base_lr=0.125"])
    assert cfg.learner.base_lr == 0.125  # --set beats env beats profile
    assert cfg.learner.batch_size == 16  # env beats profile
    assert cfg.learner.temperature == 0.2  # profile beats default
    assert cfg.model.arch == "resnet18" and cfg.model.n_prototypes == 3000  # untouched default


def test_zero_false_and_empty_survive_the_merge(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text('[learner]\nqueue_length = 4096\nbf16 = true\n[store]\nurl = "redis://x"\n')
    cfg = resolve(profile, environ={"STREAMSSL_LEARNER_BF16": "false"},
                  overrides=["learner.queue_length=0", "store.url="])
    assert cfg.learner.queue_length == 0 and cfg.learner.bf16 is False and cfg.store.url == ""
    cfg = resolve(profile, environ={}, overrides=["learner.weight_decay=0", 'store.url=""'])
    assert cfg.learner.weight_decay == 0.0 and cfg.store.url == ""


def test_lists_from_overrides_and_env() -> None:
    cfg = resolve(None, environ={"STREAMSSL_AUGMENT_SIZES": "64,32"},
                  overrides=["augment.n_views=[2, 4]", "augment.min_scale=0.2,0.05", "augment.max_scale=1,0.2"])
    assert cfg.augment.sizes == (64, 32) and cfg.augment.n_views == (2, 4)
    assert cfg.augment.min_scale == (0.2, 0.05) and cfg.augment.max_scale == (1.0, 0.2)


@pytest.mark.parametrize("override,key", [
    ("learner.lr=0.1", "learner.lr"),
    ("learner.batch_size=many", "learner.batch_size"),
    ("learner.batch_size=1.5", "learner.batch_size"),
    ("learner.base_lr=-1", "learner.base_lr"),
    ("learner.epsilon=0", "learner.epsilon"),
    ("learner.bf16=maybe", "learner.bf16"),
    ("model.arch=vgg16", "model.arch"),
    ("model.stem_stride=3", "model.stem_stride"),
    ("model.stem_stride=2", "model.stem_stride"),  # the default stem has no stride to set
    ("model.stem_pool=true", "model.stem_pool"),  # ... and its max-pool already
    ("metrics.port=70000", "metrics.port"),
    ("augment.flip_p=1.5", "augment.flip_p"),
    ("augment.sizes=[224]", "augment.n_views"),
    ("learner.crops_for_assign=[0, 8]", "learner.crops_for_assign"),
    ("nosuch.key=1", "nosuch"),
])
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve(None, environ={}, overrides=[override])


def test_bad_environment_and_profile_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"learner\.nope.*environment"):
        resolve(None, environ={"STREAMSSL_LEARNER_NOPE": "1"})
    with pytest.raises(ConfigError, match="STREAMSSL_BOGUS"):
        resolve(None, environ={"STREAMSSL_BOGUS": "1"})
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_prototypes = 1\n")
    with pytest.raises(ConfigError, match=r"model\.n_prototypes.*bad\.toml"):
        resolve(bad, environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(broken, environ={})
    with pytest.raises(ConfigError, match="no-such-profile"):
        find_profile("no-such-profile")


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        resolve(None, environ={}, overrides=["learner"])


def test_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = resolve("cpu-small", environ={}, overrides=["store.url=redis://h:1/0"])
    dumped = tmp_path / "dumped.toml"
    dumped.write_text(cfg.to_toml())
    assert resolve(dumped, environ={}) == cfg
