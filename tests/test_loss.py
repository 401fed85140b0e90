"""Swapped-prediction loss: value invariants and where gradients flow."""

from __future__ import annotations

import math

import torch

from streamssl.config import LearnerConfig, ModelConfig
from streamssl.learner.methods.sinkhorn import sinkhorn
from streamssl.learner.methods.swav import SwAV
from streamssl.learner.methods.swav_loss import swapped_prediction_loss


def swav(cfg: ModelConfig) -> SwAV:
    """SwAV's network (trunk, head, prototypes) on the CPU."""
    return SwAV(cfg, LearnerConfig(), device=torch.device("cpu"))


def test_uniform_predictions_give_log_k_whatever_the_codes() -> None:
    n_views, batch, k = 4, 5, 7
    scores = torch.zeros(n_views * batch, k)
    codes = [torch.softmax(torch.randn(batch, k), dim=1) for _ in range(2)]
    loss = swapped_prediction_loss(scores, codes, (0, 1), n_views, temperature=0.1)
    assert math.isclose(float(loss), math.log(k), rel_tol=1e-6)


def test_matches_the_authors_double_loop() -> None:
    torch.manual_seed(0)
    n_views, batch, k, temp = 5, 6, 9, 0.1
    scores = torch.randn(n_views * batch, k)
    assign = (0, 1)
    codes = [sinkhorn(scores[s * batch:(s + 1) * batch]) for s in assign]
    expected = 0.0
    for q, s in zip(codes, assign, strict=True):
        sub = 0.0
        for v in [v for v in range(n_views) if v != s]:
            x = scores[v * batch:(v + 1) * batch] / temp
            sub -= torch.mean(torch.sum(q * torch.log_softmax(x, dim=1), dim=1))
        expected += sub / (n_views - 1)
    expected /= len(assign)
    torch.testing.assert_close(swapped_prediction_loss(scores, codes, assign, n_views, temp), expected)


def test_gradients_flow_only_through_predictions() -> None:
    torch.manual_seed(0)
    model = swav(ModelConfig(arch="resnet18", hidden_dim=32, out_dim=16, n_prototypes=10))
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(2)]
    _, scores = model(views)
    # codes built from the *live* scores: the loss must still treat them as constants
    codes = [torch.softmax(scores[s * 4:(s + 1) * 4] / 0.05, dim=1) for s in (0, 1)]
    for q in codes:
        q.retain_grad()
    loss = swapped_prediction_loss(scores, codes, (0, 1), 4, 0.1)
    loss.backward()
    assert all(q.grad is None for q in codes)
    for name, part in (("trunk", model.trunk), ("head", model.head), ("prototypes", model.prototypes)):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name

    # and the gradient equals the one obtained with the codes as plain constants
    model.zero_grad()
    _, scores = model(views)
    fixed = [q.detach().clone() for q in codes]
    swapped_prediction_loss(scores, fixed, (0, 1), 4, 0.1).backward()
    proto_grad = model.prototypes.weight.grad.clone()
    model.zero_grad()
    _, scores = model(views)
    live = [torch.softmax(scores[s * 4:(s + 1) * 4] / 0.05, dim=1) for s in (0, 1)]
    swapped_prediction_loss(scores, live, (0, 1), 4, 0.1).backward()
    torch.testing.assert_close(model.prototypes.weight.grad, proto_grad)
