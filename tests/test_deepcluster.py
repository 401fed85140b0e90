"""DeepCluster-v2's labeller (learner/methods/deepcluster.py): the pseudo-labels come from a frozen copy of the
network, fixed between k-means refreshes whatever the trained network does, never trained, refreshed with the
centroids, and saved with the method."""

from __future__ import annotations

import io

import torch
from torch import nn

from streamssl.config import DeepClusterConfig, LearnerConfig, ModelConfig
from streamssl.learner.engine import Learner
from streamssl.learner.methods.base import features_by_size
from streamssl.learner.methods.deepcluster import DeepClusterV2, cluster_prediction_loss
from tests.synthetic import view_stream

MODEL = ModelConfig(arch="resnet18", hidden_dim=32, out_dim=16, n_prototypes=16)
CFG = LearnerConfig(method="deepcluster", batch_size=8, optimizer="sgd", base_lr=0.5, warmup_steps=0)


def build(memory_length: int = 10_000, refresh_steps: int = 200) -> Learner:
    return Learner.build(MODEL, CFG, settings=DeepClusterConfig(memory_length=memory_length,
                                                                refresh_steps=refresh_steps, kmeans_iters=3))


def assign_views(views: list[torch.Tensor]) -> list[torch.Tensor]:
    return [views[t] for t in CFG.crops_for_assign]


def labeller_state(method: DeepClusterV2) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in method.labeller.state_dict().items()}


def test_the_loss_is_against_the_labellers_labels_not_the_trained_networks() -> None:
    learner = build()
    method = learner.method
    views = next(view_stream(8, (32, 16), (2, 2), n_clusters=4, image_size=48))
    with torch.no_grad():
        torch.manual_seed(0)
        for p in method.trunk.parameters():  # trained network != labeller (the initial network)
            p.add_(0.5 * torch.randn_like(p))
        method.train()
        loss, _ = method.loss(views, lambda part: None, 0)
        emb = nn.functional.normalize(method.head(features_by_size(method.trunk, views)), dim=1)
        ours, _ = cluster_prediction_loss(emb, method.centroids, CFG.crops_for_assign, 4, CFG.temperature,
                                          method.label_embeddings(assign_views(views)))
        own, _ = cluster_prediction_loss(emb, method.centroids, CFG.crops_for_assign, 4, CFG.temperature)
    torch.testing.assert_close(loss, ours)
    assert not torch.isclose(loss, own)  # the old rule (the network's own nearest centroid) differs here


def test_labels_do_not_change_while_the_trained_network_does_between_refreshes() -> None:
    learner = build()  # a memory this long never fills here: no refresh
    method = learner.method
    stream = view_stream(8, (32, 16), (2, 2), n_clusters=4, image_size=48)
    probe = assign_views(next(stream))
    labels, frozen = method.labels(probe), labeller_state(method)
    trunk = {k: v.clone() for k, v in method.trunk.state_dict().items()}
    for _ in range(3):
        learner.step(next(stream))
    assert int(method.last_refresh) == -1
    assert any(not torch.equal(v, trunk[k]) for k, v in method.trunk.state_dict().items())  # it trained
    assert all(torch.equal(v, frozen[k]) for k, v in method.labeller.state_dict().items())  # BN buffers too
    assert torch.equal(method.labels(probe), labels)


def test_the_labeller_gets_no_gradient_and_is_not_in_the_optimizer() -> None:
    learner = build()
    method = learner.method
    learner.step(next(view_stream(8, (32, 16), (2, 2), n_clusters=4, image_size=48)))
    optimized = {id(p) for g in learner.optimizer.param_groups for p in g["params"]}
    labeller = list(method.labeller.parameters())
    assert labeller and all(not p.requires_grad and p.grad is None and id(p) not in optimized for p in labeller)
    assert {id(p) for p in [*method.trunk.parameters(), *method.head.parameters()]} <= optimized
    kept = {id(b) for b in method.forward_buffers()}
    assert kept and not kept & {id(b) for b in method.labeller.buffers()}  # never written: not restored either
    method.eval()
    method.train()
    assert method.labeller.training  # batch statistics whatever mode the engine sets
    assert all(not m.track_running_stats for m in method.labeller.modules() if isinstance(m, nn.BatchNorm2d))


def test_the_labeller_is_the_trained_network_of_each_k_means_refresh() -> None:
    learner = build(memory_length=32, refresh_steps=3)  # 16 rows a step: the first refresh at step index 1
    method = learner.method
    stream = view_stream(8, (32, 16), (2, 2), n_clusters=4, image_size=48)
    for step in range(6):
        learner.step(next(stream))
        trained = nn.Sequential(method.trunk, method.head).state_dict()
        same = all(torch.equal(v, trained[k]) for k, v in method.labeller.state_dict().items())
        assert same == (step in (1, 4)), step  # refreshed at steps 1 and 4, then left behind by training
        assert int(method.last_refresh) == (-1 if step < 1 else 1 if step < 4 else 4)


def test_a_checkpoint_round_trip_gives_bit_identical_labels() -> None:
    learner = build(memory_length=32, refresh_steps=3)
    stream = view_stream(8, (32, 16), (2, 2), n_clusters=4, image_size=48)
    for _ in range(3):
        learner.step(next(stream))
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    fresh = Learner.build(MODEL, LearnerConfig(**{**CFG.__dict__, "seed": CFG.seed + 1}),
                          settings=DeepClusterConfig(memory_length=32, refresh_steps=3, kmeans_iters=3))
    probe = assign_views(next(stream))
    assert not torch.equal(fresh.method.labeller[0].conv1.weight, learner.method.labeller[0].conv1.weight)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.method.labels(probe), learner.method.labels(probe))
    assert torch.equal(fresh.method.label_embeddings(probe), learner.method.label_embeddings(probe))


def test_a_checkpoint_from_before_the_labeller_takes_its_network_as_labeller() -> None:
    learner = build()
    learner.step(next(view_stream(8, (32, 16), (2, 2), n_clusters=4, image_size=48)))
    state = learner.state_dict()
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("labeller.")}
    fresh = build()
    fresh.load_state_dict(state)
    trained = nn.Sequential(learner.method.trunk, learner.method.head).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in fresh.method.labeller.state_dict().items())
