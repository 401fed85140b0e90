"""Optimisers and step-counted schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from streamssl.config import LearnerConfig
from streamssl.optim import LARS, build_optimizer, lr_at, param_groups


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
