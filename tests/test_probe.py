"""The live probe: kNN accuracy of the live trunk, bounded in time, exported while the daemon runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from streamssl.config import ModelConfig, ProbeConfig, resolve
from streamssl.learner.model import make_trunk
from streamssl.service.daemon import Daemon
from streamssl.service.probe import LiveProbe
from tests.synthetic import view_stream
from tests.test_eval import clustered_folder


def test_probe_measures_and_is_bounded(tmp_path: Path) -> None:
    clustered_folder(tmp_path / "data", n=60)
    cfg = ProbeConfig(dataset=str(tmp_path / "data"), limit_train=40, limit_test=12)
    probe = LiveProbe(cfg, size=24, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert probe.train_x.shape == (40, 3, 24, 24) and probe.test_x.shape == (12, 3, 24, 24)
    trunk = make_trunk(ModelConfig(arch="resnet18").arch).train()
    _, seconds = probe.measure(trunk)
    assert seconds > 0 and trunk.training  # left as it was found
    # raw pixels of these well-separated clusters are classified almost perfectly: the probe really votes
    pixels, _ = probe.measure(torch.nn.Flatten())
    assert pixels >= 0.9
    probe.train_y = probe.train_y[torch.randperm(len(probe.train_y), generator=torch.Generator().manual_seed(0))]
    shuffled, _ = probe.measure(torch.nn.Flatten())
    assert shuffled <= 0.7  # labels that carry no information: about chance (1/3), not a constant answer
    slow = LiveProbe(ProbeConfig(dataset=str(tmp_path / "data"), limit_train=40, limit_test=12, max_s=1e-9),
                     size=24, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert slow.measure(trunk) is None and slow.n_abandoned == 1


def test_daemon_exports_the_probe(tmp_path: Path) -> None:
    clustered_folder(tmp_path / "data", n=60)
    cfg = resolve(None, environ={}, overrides=[
        "model.arch=resnet18", "model.hidden_dim=32", "model.out_dim=16", "model.n_prototypes=16",
        "learner.batch_size=8", "learner.optimizer=sgd", "learner.base_lr=0.02", "augment.sizes=[24,12]",
        "augment.n_views=[2,2]", f"checkpoint.dir={tmp_path / 'run'}", "metrics.port=-1", "run.max_steps=4",
        f"probe.dataset={tmp_path / 'data'}", "probe.every_steps=2", "probe.limit_train=40", "probe.limit_test=12"])
    registry = CollectorRegistry()
    lines: list[str] = []
    Daemon(cfg, registry=registry, views=view_stream(8, (24, 12), (2, 2)), echo=lines.append).run()
    accuracy = registry.get_sample_value("streamssl_probe_accuracy_ratio")
    assert registry.get_sample_value("streamssl_probe_duration_seconds") > 0
    assert sum(line.startswith("probe") for line in lines) == 2
    events = [json.loads(x) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    probes = [e for e in events if e.get("event") == "probe"]
    assert [e["step"] for e in probes] == [2, 4]
    assert accuracy == pytest.approx(probes[-1]["probe_top1"], abs=1e-6)  # the gauge is the last measurement
    expected = probe_alone(tmp_path, cfg, registry)
    assert accuracy == pytest.approx(expected)  # and the same number the probe gives for the final trunk


def probe_alone(tmp_path: Path, cfg, registry) -> float:
    from streamssl.learner.engine import Learner
    from streamssl.service.checkpoint import CheckpointManager

    learner = Learner.build(cfg.model, cfg.learner)
    learner.load_state_dict(CheckpointManager(tmp_path / "run").load()["learner"])
    probe = LiveProbe(cfg.probe, size=cfg.augment.sizes[0], mean=cfg.augment.mean, std=cfg.augment.std)
    return probe.measure(learner.model.trunk)[0]
