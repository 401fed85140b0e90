"""Optimisers and step-counted learning-rate schedules.

LARS (You et al. 2017) as SwAV, SimCLR and BYOL use it for large batches: SGD with momentum where each weight
tensor's update is scaled by ``eta * ||w|| / (||g|| + wd * ||w||)``. As in SimCLR/BYOL, batch-norm parameters
and biases (every tensor with ndim <= 1) get neither weight decay nor the trust ratio. torch ships SGD and
AdamW but no LARS; the few lines below are written here rather than pulling in a library for them.

Schedules are pure functions of the optimizer step, and for a bounded run of the fraction of its budget used
(never of epochs, which an unbounded stream does not have): linear warmup, then constant (the default for
unbounded runs), cosine cycles that restart at the peak, or one cosine over the run's budget. The last is for
runs that know their end (``run.max_steps``, ``max_images`` or ``max_seconds``): the daemon passes the
fraction of the budget used, measured as it measures the budget, so the rate reaches ``final_lr`` exactly
when the run stops, whatever the machine's speed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from streamssl.config import LearnerConfig


class LARS(Optimizer):
    """SGD with momentum and a layer-wise trust ratio.

    Param groups carry ``lars`` (bool): False for BN/bias groups, which skip the trust ratio.
    """

    def __init__(self, params: Iterable, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "trust_coefficient": trust_coefficient, "eps": eps, "lars": True}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update of every parameter with a gradient, a group at a time with multi-tensor (foreach)
        operations: about ten calls a group whatever its size, where a loop over the tensors (161 in a
        ResNet-50) launched several small kernels for each. The trust ratios stay on the device (no readback)."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["lars"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = group["trust_coefficient"] * w_norm / (g_norm + group["eps"])
                # no adaptation where either norm is zero (fresh zero-init layers, zero grads)
                trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                grads = torch._foreach_mul(grads, list(trust.unbind()))
            for p in params:  # a zero buffer: the first update's buffer is then the (adapted) gradient itself
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and BN parameters and biases (neither)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars": True},
            {"params": no_decay, "weight_decay": 0.0, "lars": False}]


def build_optimizer(model: nn.Module | list[dict], cfg: LearnerConfig) -> Optimizer:
    """The configured optimizer over a model's ``param_groups``, or over groups a method made itself."""
    groups = param_groups(model, cfg.weight_decay) if isinstance(model, nn.Module) else [dict(g) for g in model]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.base_lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    for g in groups:
        g.pop("lars")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.base_lr, betas=(cfg.momentum, 0.999))
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_at(step: int, cfg: LearnerConfig, progress: float | None = None) -> float:
    """Learning rate at optimizer step ``step`` (0-based).

    ``progress``: the fraction of the run's budget used so far, in [0, 1]; the ``budget`` schedule needs it.
    """
    if step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (cfg.base_lr - cfg.warmup_start_lr) * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.base_lr
    if cfg.schedule == "budget":
        if progress is None:
            raise ValueError("learner.schedule = budget needs the fraction of the run's budget used")
        t = min(max(progress, 0.0), 1.0)
    else:
        t = ((step - cfg.warmup_steps) % cfg.cycle_steps) / cfg.cycle_steps
    return cfg.final_lr + 0.5 * (cfg.base_lr - cfg.final_lr) * (1 + math.cos(math.pi * t))


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
