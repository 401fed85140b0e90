"""Collapse: the monitor's decisions, and a forced collapse that the daemon detects and recovers from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from streamssl.config import CollapseConfig, resolve
from streamssl.learner.methods.swav import max_code_entropy
from streamssl.service.collapse import Action, CollapseMonitor
from streamssl.service.daemon import Daemon
from tests.synthetic import view_stream


def test_monitor_snapshots_when_healthy_and_recovers_after_patience() -> None:
    monitor = CollapseMonitor(CollapseConfig(min_entropy_ratio=0.5, patience_steps=3, snapshot_every_steps=2,
                                             recovery_steps=5), healthy=2.0)
    actions = [monitor.update(step, 1.8) for step in range(1, 6)]
    assert actions == [Action.SNAPSHOT, Action.NONE, Action.SNAPSHOT, Action.NONE, Action.SNAPSHOT]
    # two low steps then a healthy one: patience restarts
    assert [monitor.update(s, 0.2) for s in (6, 7)] == [Action.NONE, Action.NONE]
    assert monitor.update(8, 1.5) is Action.SNAPSHOT and monitor.low_steps == 0  # healthy again, 3 steps on
    assert [monitor.update(s, 0.2) for s in (9, 10, 11)] == [Action.NONE, Action.NONE, Action.RECOVER]
    assert monitor.collapsed
    monitor.start_recovery(4)  # rolled back to step 4
    assert [monitor.update(s, 0.1) for s in (5, 6, 7, 8)] == [Action.NONE] * 4  # no snapshot of a collapsed model
    assert monitor.update(9, 1.5) is Action.RECOVERED and not monitor.collapsed


def test_monitor_off() -> None:
    monitor = CollapseMonitor(CollapseConfig(min_entropy_ratio=0.0, patience_steps=1), healthy=2.0)
    assert all(monitor.update(s, 0.0) is Action.NONE for s in range(10))


def test_max_code_entropy() -> None:
    assert max_code_entropy(8, 2, 100) == math.log(16)
    assert max_code_entropy(256, 2, 100) == math.log(100)


def test_forced_collapse_is_detected_rolled_back_and_recovered(tmp_path: Path) -> None:
    cfg = resolve(None, environ={}, overrides=[
        "model.arch=resnet18", "model.hidden_dim=32", "model.out_dim=16", "model.n_prototypes=16",
        "learner.batch_size=16", "learner.optimizer=sgd", "learner.base_lr=0.02", "learner.warmup_steps=0",
        "augment.sizes=[32,16]", "augment.n_views=[2,2]", f"checkpoint.dir={tmp_path}", "metrics.port=-1",
        "collapse.min_entropy_ratio=0.3", "collapse.patience_steps=3", "collapse.snapshot_every_steps=2",
        "collapse.recovery_steps=6", "collapse.epsilon_factor=0.5", "run.max_steps=20", "run.log_every_steps=1"])
    registry = CollectorRegistry()
    entropy: list[tuple[int, float]] = []  # in order: steps repeat after the rollback
    seen: dict[str, object] = {}

    def views():
        normal = view_stream(16, (32, 16), (2, 2), n_clusters=4, image_size=48)
        while True:
            learner = daemon.learner
            if learner.step_count >= 6 and not daemon.recovery.monitor.collapsed and "recovered" not in seen:
                # sabotage: the head maps every image to the same embedding (a collapsed representation)
                with torch.no_grad():
                    learner.model.head[-1].weight.zero_()
                    learner.model.head[-1].bias.fill_(1.0)
            if daemon.recovery.monitor.collapsed:
                seen["recovered"] = True
                seen.setdefault("eps", learner.method.epsilon)
                seen.setdefault("frozen_until", learner.method.frozen_until)
                seen.setdefault("collapsed_gauge", registry.get_sample_value("streamssl_learner_collapsed"))
            yield next(normal)

    daemon = Daemon(cfg, registry=registry, views=views(), echo=lambda line: None)
    daemon.run()
    assert registry.get_sample_value("streamssl_learner_collapse_recoveries_total") == 1
    assert seen["eps"] == cfg.learner.epsilon * 0.5 and seen["collapsed_gauge"] == 1
    events = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    # the run's structured record of every progress interval (log_every_steps = 1), not the human line
    entropy += [(e["step"], e["code_entropy"]) for e in events if "event" not in e]
    collapse = next(e for e in events if e.get("event") == "collapse")
    assert collapse["rolled_back_to"] < collapse["step"] and collapse["rolled_back_to"] <= 6
    assert seen["frozen_until"] == collapse["rolled_back_to"] + 6
    assert any(e.get("event") == "recovered" for e in events)
    threshold = 0.3 * math.log(16)
    before_rollback = entropy[:collapse["step"]]
    assert [s for s, _ in before_rollback] == list(range(1, collapse["step"] + 1))
    assert all(h < threshold for s, h in before_rollback if s > 6)  # the sabotage collapsed it
    after = entropy[collapse["step"]:]
    assert after[0][0] == collapse["rolled_back_to"] + 1  # training went on from the snapshot
    assert all(h > threshold for _, h in after)  # and stayed spread over prototypes
    assert after[-1][0] == 20
    assert daemon.learner.method.epsilon == cfg.learner.epsilon  # recovery over: eps restored
    assert registry.get_sample_value("streamssl_learner_collapsed") == 0
