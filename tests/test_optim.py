"""Optimisers and step-counted schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from streamssl.config import LearnerConfig
from streamssl.learner.optim import LARS, build_optimizer, lr_at, param_groups


def test_warmup_then_constant() -> None:
    cfg = LearnerConfig(base_lr=1.0, warmup_steps=10, warmup_start_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(5, cfg) == pytest.approx(0.55)
    assert [lr_at(s, cfg) for s in (10, 11, 10**7)] == [1.0, 1.0, 1.0]
    lrs = [lr_at(s, cfg) for s in range(11)]
    assert lrs == sorted(lrs)


def test_cosine_cycles_restart() -> None:
    cfg = LearnerConfig(base_lr=1.0, final_lr=0.01, warmup_steps=0, schedule="cosine", cycle_steps=100)
    assert lr_at(0, cfg) == pytest.approx(1.0)
    assert lr_at(50, cfg) == pytest.approx(0.505)
    assert lr_at(99, cfg) < 0.02
    assert lr_at(100, cfg) == pytest.approx(1.0)
    assert lr_at(250, cfg) == pytest.approx(lr_at(50, cfg))


def test_bn_and_bias_get_no_decay_nor_adaptation() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert {p.ndim for p in decay["params"]} == {2, 4}
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 4  # biases, BN
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lars"] and not no_decay["lars"]


def test_lars_update_is_the_trust_ratio_times_the_gradient() -> None:
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w], "lars": True, "weight_decay": 0.0}, {"params": [b], "lars": False,
                                                                       "weight_decay": 0.0}],
               lr=1.0, momentum=0.0, trust_coefficient=0.01)
    w.grad = torch.tensor([0.0, 2.0])  # |g| = 2
    b.grad = torch.tensor([2.0])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0 - 0.01 * 5 / 2 * 2]))
    torch.testing.assert_close(b.detach(), torch.tensor([-1.0]))  # plain SGD


def test_lars_with_zero_weights_or_gradients_stays_finite() -> None:
    w = nn.Parameter(torch.zeros(3))
    opt = LARS([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), torch.zeros(3))
    w.grad = torch.zeros(3)
    opt.step()
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name: str, cls: type) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = build_optimizer(model, LearnerConfig(optimizer=name, weight_decay=0.5))
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    assert not math.isnan(opt.param_groups[0]["lr"])


def test_budget_schedule_follows_the_fraction_of_the_budget_used() -> None:
    cfg = LearnerConfig(base_lr=1.0, final_lr=0.01, warmup_steps=10, schedule="budget")
    assert lr_at(5, cfg, progress=0.9) == pytest.approx(0.5)  # warmup still counts in steps
    assert lr_at(10, cfg, progress=0.0) == pytest.approx(1.0)
    assert lr_at(10**6, cfg, progress=0.5) == pytest.approx(0.505)  # the step count does not matter
    assert lr_at(11, cfg, progress=1.0) == pytest.approx(0.01)
    assert lr_at(11, cfg, progress=1.7) == pytest.approx(0.01)  # past the end: stays at final_lr
    lrs = [lr_at(20, cfg, progress=p / 10) for p in range(11)]
    assert lrs == sorted(lrs, reverse=True)
    with pytest.raises(ValueError, match="budget"):
        lr_at(20, cfg)


def _textbook_lars(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor | None], *,
                   lr: float, momentum: float, wd: float, coef: float, eps: float, lars: bool) -> None:
    """You et al. 2017, one tensor at a time in float64 (the loop LARS.step replaces with foreach ops)."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        g = g + wd * p
        if lars:
            w_norm, g_norm = p.norm(), g.norm()
            if w_norm > 0 and g_norm > 0:
                g = g * coef * w_norm / (g_norm + eps)
        bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
        p -= lr * bufs[i]


def test_lars_matches_a_textbook_loop_over_several_steps() -> None:
    """The multi-tensor step equals the per-tensor loop of the paper over steps with momentum, weight decay,
    a zero-initialised tensor, a zero gradient and a group without adaptation."""
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 3, 3, 3), (16, 8), (5,), (4, 4)]
    start = [torch.randn(s, generator=g) for s in shapes]
    start[3].zero_()  # a fresh zero-init layer
    params = [nn.Parameter(t.clone()) for t in start]
    opt = LARS([{"params": params[:2] + params[3:], "lars": True, "weight_decay": 1e-3},
                {"params": [params[2]], "lars": False, "weight_decay": 0.0}],
               lr=0.5, momentum=0.9, trust_coefficient=0.02)
    ref = [t.double() for t in start]
    bufs: list[torch.Tensor | None] = [None] * 4
    for step in range(4):
        grads = [torch.randn(s, generator=g) for s in shapes]
        if step == 2:
            grads[1].zero_()
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone()
        opt.step()
        group_of = [0, 0, 1, 0]
        for i in range(4):
            lars = group_of[i] == 0
            one = [bufs[i]]
            _textbook_lars([ref[i]], [grads[i].double()], one, lr=0.5, momentum=0.9, wd=1e-3 if lars else 0.0,
                           coef=0.02, eps=1e-8, lars=lars)
            bufs[i] = one[0]
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)
