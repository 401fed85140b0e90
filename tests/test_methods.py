"""The methods beside SwAV: each loss against an independent float64 computation, BYOL's target (no gradient,
its EMA exactly, untouched by a skipped step), a checkpoint round trip of every method, and every method as a
daemon on real shards: metrics, resume, export and the live probe."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from streamssl.config import BYOLConfig, LearnerConfig, MoCoConfig, ModelConfig, resolve
from streamssl.learner.engine import Learner
from streamssl.learner.methods import METHODS
from streamssl.learner.methods.byol import momentum_at, normalized_mse
from streamssl.learner.methods.deepcluster import cluster_prediction_loss, spherical_kmeans
from streamssl.learner.methods.moco import info_nce
from streamssl.learner.methods.simclr import nt_xent
from streamssl.service.daemon import Daemon
from streamssl.tools.export import export, torchvision_model
from tests.synthetic import view_stream
from tests.test_daemon import config, make_shards
from tests.test_eval import clustered_folder

MODEL = ModelConfig(arch="resnet18", hidden_dim=32, out_dim=16, n_prototypes=16)


def textbook_nt_xent(z: torch.Tensor, n_views: int, temperature: float) -> float:
    """Chen et al. 2020, eq. 1, anchor by anchor in float64; positives: the other views of the same image."""
    z = torch.nn.functional.normalize(z.double(), dim=1)
    n, batch = z.shape[0], z.shape[0] // n_views
    total = 0.0
    for i in range(n):
        others = [k for k in range(n) if k != i]
        denominator = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in others)
        positives = [k for k in others if k % batch == i % batch]
        total += sum(-math.log(math.exp(float(z[i] @ z[k]) / temperature) / denominator)
                     for k in positives) / len(positives)
    return total / n


@pytest.mark.parametrize("n_views", [2, 3])
def test_nt_xent_is_the_papers_loss(n_views: int) -> None:
    z = torch.randn(n_views * 6, 8, generator=torch.Generator().manual_seed(n_views))
    assert float(nt_xent(z, n_views, 0.3)) == pytest.approx(textbook_nt_xent(z, n_views, 0.3), rel=1e-5)


def test_normalized_mse_is_the_squared_distance_of_unit_vectors() -> None:
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g) * 3
    expected = ((p.double() / p.double().norm(dim=1, keepdim=True)
                 - z.double() / z.double().norm(dim=1, keepdim=True)) ** 2).sum(dim=1).mean()
    assert float(normalized_mse(p, z)) == pytest.approx(float(expected), rel=1e-5)


def test_byol_momentum_follows_a_cosine_in_steps_then_stays() -> None:
    settings = BYOLConfig(momentum=0.9, final_momentum=0.99, momentum_steps=100)
    values = [momentum_at(s, settings) for s in range(0, 201, 10)]
    assert values[0] == pytest.approx(0.9) and values[10] == pytest.approx(0.99) and values[-1] == pytest.approx(0.99)
    assert values == sorted(values) and momentum_at(50, settings) == pytest.approx(0.945)


def byol_learner() -> Learner:
    return Learner.build(MODEL, LearnerConfig(method="byol", batch_size=8, optimizer="sgd", base_lr=0.1,
                                              warmup_steps=0), settings=BYOLConfig(momentum=0.9, predictor_dim=32))


def test_byol_target_gets_no_gradient_and_follows_its_ema_exactly() -> None:
    learner = byol_learner()
    method = learner.method
    views = view_stream(8, (32, 16), (2, 2), n_clusters=4, image_size=48)
    target_before = [p.detach().clone() for p in method._target()]
    online_before = [p.detach().clone() for p in method._online()]
    stats = learner.step(next(views))
    assert not stats.skipped
    assert all(not p.requires_grad and p.grad is None for p in method._target())
    assert not any(p.requires_grad for p in method.target_trunk.parameters())
    assert all(id(p) not in {id(q) for g in learner.optimizer.param_groups for q in g["params"]}
               for p in method._target())  # not in the optimizer either
    tau = momentum_at(0, method.settings)
    online_after = [p.detach() for p in method._online()]
    assert any(not torch.equal(a, b) for a, b in zip(online_before, online_after, strict=True))
    for before, online, target in zip(target_before, online_after, method._target(), strict=True):
        torch.testing.assert_close(target.detach(), tau * before + (1 - tau) * online, rtol=1e-6, atol=1e-7)
    target_now = [p.detach().clone() for p in method._target()]
    bad = next(views)
    bad[0][:] = float("nan")
    assert learner.step(bad).skipped
    assert all(torch.equal(a, b) for a, b in zip(target_now, method._target(), strict=True))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_checkpoint_round_trip_continues_identically(method: str) -> None:
    cfg = LearnerConfig(method=method, batch_size=8, optimizer="lars", base_lr=0.3, warmup_steps=2,
                        queue_length=16 if method == "swav" else 0)
    a = Learner.build(MODEL, cfg)
    views = list(zip(range(5), view_stream(8, (32, 16), (2, 2), n_clusters=4, image_size=48), strict=False))
    for _, v in views[:2]:
        a.step(v)
    b = Learner.build(MODEL, LearnerConfig(**{**cfg.__dict__, "seed": 9}))  # another init, overwritten
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for _, v in views[2:]:
        sa, sb = a.step(v), b.step(v)
        assert sa.loss == sb.loss and sa.diagnostics == sb.diagnostics
    other = next(m for m in METHODS if m != method)
    with pytest.raises(ValueError, match=f"learner.method {method!r}"):
        Learner.build(MODEL, LearnerConfig(**{**cfg.__dict__, "method": other, "queue_length": 0})
                      ).load_state_dict(a.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "deepcluster", "npid"])
def test_every_method_runs_as_a_daemon_with_metrics_resume_export_and_probe(tmp_path: Path, method: str) -> None:
    shards = make_shards(tmp_path, 2)
    clustered_folder(tmp_path / "labeled", n=40)
    extra = [f"learner.method={method}", f"source.urls=[\"{shards[0]}\", \"{shards[1]}\"]", "metrics.port=-1",
             "checkpoint.every_steps=2", f"probe.dataset={tmp_path / 'labeled'}", "probe.every_steps=2",
             "probe.limit_train=24", "probe.limit_test=8", "byol.predictor_dim=32", "moco.queue_length=24",
             "deepcluster.memory_length=16", "deepcluster.refresh_steps=2",
             "npid.memory_length=32", "npid.negatives=8"]
    registry = CollectorRegistry()
    lines: list[str] = []
    first = Daemon(config(tmp_path, *extra, "run.max_steps=3"), registry=registry, echo=lines.append).run()
    assert first.steps == 3 and first.error is None and first.checkpoint
    spread = registry.get_sample_value("streamssl_learner_embedding_std")
    entropy = registry.get_sample_value("streamssl_learner_code_entropy_nats")
    if method == "deepcluster":  # SwAV's code diagnostics; the centroids are what the store holds
        assert entropy > 0 and spread is None
        from streamssl.store import LocalPrototypeStore

        centroids, meta = LocalPrototypeStore(tmp_path / "run" / "store").read()
        assert centroids.shape == (16, 16) and meta.step == 3
    else:
        assert spread > 0 and entropy is None  # SwAV's gauge is not declared for this method
    assert registry.get_sample_value("streamssl_learner_part_seconds_count", {"part": "loss"}) == 3
    assert registry.get_sample_value("streamssl_probe_accuracy_ratio") is not None
    label = "code entropy" if method == "deepcluster" else "embedding std"
    assert any(label in line for line in lines if line.startswith("step"))
    lines.clear()
    second = Daemon(config(tmp_path, *extra, "run.max_steps=5"), echo=lines.append).run()
    assert any(line.startswith("resumed from") and "at step 3" in line for line in lines)
    assert second.steps == 5 and second.error is None
    meta = export(second.checkpoint, "torchvision", tmp_path / "trunk.pt")
    model = torchvision_model(meta)
    model.load_state_dict(torch.load(tmp_path / "trunk.pt", weights_only=True), strict=True)


def test_a_collapsed_byol_is_seen_by_its_embedding_spread_rolled_back_and_recovered(tmp_path: Path) -> None:
    cfg = resolve(None, environ={}, overrides=[
        "learner.method=byol", "byol.predictor_dim=32", "model.arch=resnet18", "model.hidden_dim=32",
        "model.out_dim=16", "learner.batch_size=16", "learner.optimizer=sgd", "learner.base_lr=0.02",
        "learner.warmup_steps=0", "augment.sizes=[32,16]", "augment.n_views=[2,2]", f"checkpoint.dir={tmp_path}",
        "metrics.port=-1", "collapse.min_entropy_ratio=0.3", "collapse.patience_steps=3",
        "collapse.snapshot_every_steps=2", "collapse.recovery_steps=4", "run.max_steps=16"])
    registry = CollectorRegistry()
    seen: dict[str, object] = {}

    def views():
        normal = view_stream(16, (32, 16), (2, 2), n_clusters=4, image_size=48)
        while True:
            learner = daemon.learner
            if learner.step_count >= 5 and not daemon.recovery.monitor.collapsed and "recovering" not in seen:
                with torch.no_grad():  # sabotage: every image projects to the same point
                    learner.model.head[-1].weight.zero_()
                    learner.model.head[-1].bias.fill_(1.0)
            if daemon.recovery.monitor.collapsed:
                seen.setdefault("recovering", learner.method.recovering)
            yield next(normal)

    daemon = Daemon(cfg, registry=registry, views=views(), echo=lambda line: None)
    daemon.run()
    assert registry.get_sample_value("streamssl_learner_collapse_recoveries_total") == 1
    assert seen["recovering"] is True  # the target held at its slowest momentum during the recovery
    assert daemon.learner.method.recovering is False and registry.get_sample_value("streamssl_learner_collapsed") == 0
    assert registry.get_sample_value("streamssl_learner_embedding_std") > 0.3 / math.sqrt(16)  # spread again


def test_info_nce_with_a_queue_is_the_textbook_loss() -> None:
    g = torch.Generator().manual_seed(3)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=1)  # noqa: E731
    q, k, queue = unit(5, 8), unit(5, 8), unit(7, 8)
    expected = 0.0
    for i in range(5):
        logits = [float(q[i].double() @ k[i].double()) / 0.2] + [float(q[i].double() @ n.double()) / 0.2
                                                                  for n in queue]
        expected += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    assert float(info_nce(q, k, queue, 0.2)) == pytest.approx(expected / 5, rel=1e-5)


def test_moco_keys_join_the_queue_only_after_their_loss_and_the_key_encoder_is_an_ema() -> None:
    learner = Learner.build(MODEL, LearnerConfig(method="moco", batch_size=8, optimizer="sgd", base_lr=0.1,
                                                 warmup_steps=0), settings=MoCoConfig(queue_length=24, momentum=0.9))
    method = learner.method
    views = view_stream(8, (32, 16), (2, 2), n_clusters=4, image_size=48)
    seen: dict[str, torch.Tensor] = {}
    real = info_nce

    def spy(q, k, queue, temperature):
        seen.setdefault("queue", queue.clone())
        seen.setdefault("keys", k.clone())
        return real(q, k, queue, temperature)

    import streamssl.learner.methods.moco as moco_module

    moco_module.info_nce, original = spy, moco_module.info_nce
    try:
        queue_before = method.queue.clone()
        key_before = [p.detach().clone() for p in method._momentum()]
        learner.step(next(views))
    finally:
        moco_module.info_nce = original
    assert torch.equal(seen["queue"], queue_before)  # the loss met the queue without this batch's keys
    assert not any(torch.equal(key, row) for key in seen["keys"] for row in seen["queue"])
    assert int(method.queue_ptr) == 16  # then both views' keys (2 x 8) went in, oldest rows first
    assert torch.equal(method.queue[16:], queue_before[16:]) and not torch.equal(method.queue[:16], queue_before[:16])
    assert all(not p.requires_grad and p.grad is None for p in method._momentum())
    for before, online, key in zip(key_before, method._online(), method._momentum(), strict=True):
        torch.testing.assert_close(key.detach(), 0.9 * before + 0.1 * online.detach(), rtol=1e-6, atol=1e-7)
    learner.step(next(views))
    assert int(method.queue_ptr) == (32 % 24)  # FIFO wraps: bounded at queue_length
    queue_now = method.queue.clone()
    bad = next(views)
    bad[0][:] = float("nan")
    assert learner.step(bad).skipped and torch.equal(method.queue, queue_now) and int(method.queue_ptr) == 8


def test_spherical_kmeans_finds_planted_clusters_with_unit_centroids() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    labels = torch.arange(200) % 4
    x = torch.nn.functional.normalize(centres[labels] + 0.1 * torch.randn(200, 16, generator=g), dim=1)
    start = x[torch.tensor([0, 1, 2, 3])] + 0.5 * torch.randn(4, 16, generator=g)  # one rough seed per cluster
    c = spherical_kmeans(x, start, iters=5)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(4))
    assert ((x @ c.T).argmax(dim=1) == labels).all()
    assert (c * centres).sum(dim=1).min() > 0.99


def test_deepcluster_loss_is_cross_entropy_against_the_other_views_nearest_centroid() -> None:
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(3 * 4, 8, generator=g), dim=1)  # 3 views of 4 images
    centroids = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    loss, labels = cluster_prediction_loss(emb, centroids, [0, 1], 3, 0.1)
    expected = 0.0
    for t in (0, 1):
        for i in range(4):
            label = int(max(range(5), key=lambda c: float(emb[t * 4 + i].double() @ centroids[c].double())))
            assert int(labels[t][i]) == label
            for v in range(3):
                if v == t:
                    continue
                logits = [float(emb[v * 4 + i].double() @ centroids[c].double()) / 0.1 for c in range(5)]
                expected += -logits[label] + math.log(sum(math.exp(x) for x in logits))
    assert float(loss) == pytest.approx(expected / (4 * 4), rel=1e-5)


def test_deepcluster_reclusters_its_memory_when_full_and_then_every_refresh() -> None:
    from streamssl.config import DeepClusterConfig

    learner = Learner.build(MODEL, LearnerConfig(method="deepcluster", batch_size=8, optimizer="sgd",
                                                 base_lr=0.1, warmup_steps=0),
                            settings=DeepClusterConfig(memory_length=32, refresh_steps=3, kmeans_iters=3))
    method = learner.method
    views = view_stream(8, (32, 16), (2, 2), n_clusters=4, image_size=48)
    start = method.centroids.clone()
    refreshed = []
    for _ in range(6):  # 16 embeddings a step (2 assignment views x 8): full after step 2 (index 1)
        learner.step(next(views))
        refreshed.append(int(method.last_refresh))
    assert refreshed == [-1, 1, 1, 1, 4, 4]
    assert not torch.equal(method.centroids, start) and not method.centroids.requires_grad
    torch.testing.assert_close(method.centroids.norm(dim=1), torch.ones(MODEL.n_prototypes))
    assert all(id(method.centroids) != id(p) for g in learner.optimizer.param_groups for p in g["params"])


def test_deepcluster_refresh_starts_from_memory_rows_so_a_collapsed_clustering_comes_back() -> None:
    from streamssl.config import DeepClusterConfig

    learner = Learner.build(MODEL, LearnerConfig(method="deepcluster", batch_size=8, optimizer="sgd",
                                                 base_lr=0.1, warmup_steps=0),
                            settings=DeepClusterConfig(memory_length=400, kmeans_iters=10))
    method = learner.method
    g = torch.Generator().manual_seed(2)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    method.memory.copy_(torch.nn.functional.normalize(
        centres[torch.arange(400) % 4] + 0.05 * torch.randn(400, 16, generator=g), dim=1))
    method.centroids.copy_(method.centroids[:1].expand_as(method.centroids))  # every centroid the same one
    method.refresh(step=10)
    c = method.centroids
    torch.testing.assert_close(c.norm(dim=1), torch.ones(len(c)))
    assert (centres @ c.T).max(dim=1).values.min() > 0.99  # every planted cluster has a centroid again
    assert len({int(i) for i in (method.memory @ c.T).argmax(dim=1)}) >= 4


def test_deepcluster_needs_a_memory_row_per_centroid() -> None:
    from streamssl.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="memory_length"):
        resolve(None, overrides=["learner.method=deepcluster", "model.n_prototypes=512",
                                 "deepcluster.memory_length=256"])
    resolve(None, overrides=["learner.method=swav", "model.n_prototypes=512", "deepcluster.memory_length=256"])


def test_npid_memory_is_keyed_by_sample_id_bounded_and_moves_towards_new_embeddings() -> None:
    import hashlib

    from streamssl.config import NPIDConfig
    from streamssl.learner.methods.npid import EMPTY, id_key

    expected_key = int.from_bytes(hashlib.blake2b(b"shard-0.tar#img7", digest_size=8).digest(), "big") >> 1
    assert id_key("shard-0.tar#img7") == expected_key  # stable across processes, unlike hash()
    learner = Learner.build(MODEL, LearnerConfig(method="npid", batch_size=8, optimizer="sgd", base_lr=0.1,
                                                 warmup_steps=0),
                            settings=NPIDConfig(memory_length=12, negatives=4, memory_momentum=0.5))
    method = learner.method
    views = view_stream(8, (32, 16), (2, 2), n_clusters=4, image_size=48)
    first = [f"s.tar#{i}" for i in range(8)]
    stats = learner.step(next(views), ids=first)
    assert stats.diagnostics["memory_hit"] == 0.0 and int((method.bank_keys != EMPTY).sum()) == 8
    torch.testing.assert_close(method.bank[:8].norm(dim=1), torch.ones(8))
    before = method.bank.clone()
    stats = learner.step(next(views), ids=first[:4] + [f"s.tar#{i}" for i in range(8, 12)])  # half seen before
    assert stats.diagnostics["memory_hit"] == 0.5
    assert sorted(method.bank_keys.tolist()) == sorted(id_key(f"s.tar#{i}") for i in range(12))  # full, bounded
    slots = [method.bank_keys.tolist().index(id_key(f"s.tar#{i}")) for i in range(4)]
    assert all(float(method.bank[k] @ before[k]) < 1.0 - 1e-6 for k in slots)  # the seen ones moved
    learner.step(next(views), ids=[f"s.tar#{i}" for i in range(12, 20)])
    assert int((method.bank_keys != EMPTY).sum()) == 12  # still bounded: the oldest were overwritten
    assert id_key("s.tar#19") in method.bank_keys.tolist() and id_key("s.tar#4") not in method.bank_keys.tolist()


def test_npid_memory_update_is_the_papers_moving_average() -> None:
    from streamssl.config import NPIDConfig

    learner = Learner.build(MODEL, LearnerConfig(method="npid", batch_size=4),
                            settings=NPIDConfig(memory_length=8, memory_momentum=0.5))
    method = learner.method
    g = torch.Generator().manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, MODEL.out_dim, generator=g), dim=1)  # noqa: E731
    method.bank[:4] = unit(4)
    method.bank_keys[:4] = torch.arange(4) + 100
    old, f = method.bank[:4].clone(), unit(4)
    method._pending = (torch.tensor([100, 101, 7, 8]), f)  # keys 100 and 101 are in the bank (slots 0, 1)
    method.bank_ptr.fill_(4)
    method.after_update(0)
    torch.testing.assert_close(method.bank[:2], torch.nn.functional.normalize(0.5 * old[:2] + 0.5 * f[:2], dim=1))
    torch.testing.assert_close(method.bank[4:6], f[2:])  # new instances enter at the write pointer
    assert method.bank_keys[4:6].tolist() == [7, 8] and int(method.bank_ptr) == 6
