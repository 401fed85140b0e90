"""The live probe: kNN accuracy of the live trunk, bounded in time, exported while the daemon runs."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry

from streamssl.config import ModelConfig, ProbeConfig, resolve
from streamssl.daemon import Daemon
from streamssl.model import make_trunk
from streamssl.probe import LiveProbe
from streamssl.synthetic import view_stream
from tests.test_eval import clustered_folder


def test_probe_measures_and_is_bounded(tmp_path: Path) -> None:
    clustered_folder(tmp_path / "data", n=60)
    cfg = ProbeConfig(dataset=str(tmp_path / "data"), limit_train=40, limit_test=12)
    probe = LiveProbe(cfg, size=24, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert probe.train_x.shape == (40, 3, 24, 24) and probe.test_x.shape == (12, 3, 24, 24)
    trunk = make_trunk(ModelConfig(arch="resnet18").arch).train()
    top1, seconds = probe.measure(trunk)
    assert 0 <= top1 <= 1 and seconds > 0
    assert trunk.training  # left as it was found
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
    assert accuracy is not None and 0 < accuracy <= 1
    assert registry.get_sample_value("streamssl_probe_duration_seconds") > 0
    assert sum(line.startswith("probe") for line in lines) == 2
    events = [json.loads(x) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "probe"] == [2, 4]
