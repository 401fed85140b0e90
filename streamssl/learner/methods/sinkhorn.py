"""Codes from scores: the Sinkhorn-Knopp equipartition of SwAV (Caron et al. 2020, section 3.1 and A.1).

Given prototype scores ``S`` (B, K) of a batch (the queue's rows first, when there is one), SwAV looks for
soft codes ``Q`` that agree with the scores and spread the batch evenly over the K prototypes:

    max_Q  Tr(Q^T S) + eps * H(Q)   s.t.  every prototype gets B/K of the mass, every sample a unit mass.

The solution is ``Q = diag(u) exp(S / eps) diag(v)``; ``n_iters`` rounds of alternate column (prototype)
and row (sample) normalisation find u and v (3 rounds suffice, as in the paper). The last normalisation is
over samples, so every returned code sums exactly to 1.

Numerics. Working in float32 (even under autocast) and subtracting the maximum score of the whole batch (all
processes) makes ``exp`` overflow-free; a global factor cancels exactly in the first prototype normalisation,
so the result is unchanged. When the spread of ``S / eps`` is so wide that
``exp`` would underflow whole rows to zero (un-normalised scores, eps down to 0.01), the same iterations run
in the log domain instead, with logsumexp; both paths compute the same codes where both are defined.

Multi-process use: pass ``reduce(tensor, op)`` that all-reduces a tensor in place across processes with
``op`` "sum" or "max" (``torch_distributed_reduce`` does it with torch.distributed). The math itself never
touches a process group.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Reduce = Callable[[Tensor, str], None]
"""All-reduce ``tensor`` in place across processes; op is "sum" or "max"."""

# exp(-LOG_DOMAIN_SPREAD) stays far above float32's smallest normal number even after the ~1/(B*K) factors
# of the iterations, so below this spread of S/eps the multiplicative path cannot underflow a row.
LOG_DOMAIN_SPREAD = 50.0


def torch_distributed_reduce(tensor: Tensor, op: str) -> None:
    """A ``Reduce`` over the default torch.distributed process group."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)


@torch.no_grad()
def sinkhorn(scores: Tensor, *, n_iters: int = 3, eps: float = 0.05, reduce: Reduce | None = None,
             max_spread: float | None = None) -> Tensor:
    """Soft codes for a batch of prototype scores.

    Args:
        scores: (B, K) prototype scores of this process's part of the batch (queue rows included).
        n_iters: Sinkhorn-Knopp rounds.
        eps: entropy regularisation; smaller gives sharper codes.
        reduce: all-reduce across processes, or None for a single process.
        max_spread: a bound the caller knows on max(scores) - min(scores) (cosine scores: 2). When it keeps
            the multiplicative path safe, the path is chosen without reading the scores' range back from
            the device, so the codes cost no wait for a GPU.

    Returns:
        (B, K) float32 codes, each row summing to 1, without gradient.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, K), got {tuple(scores.shape)}")
    if n_iters < 1 or eps <= 0:
        raise ValueError("n_iters must be >= 1 and eps > 0")
    scores = scores.detach().float()  # (B, K)
    # Global extrema in one reduce: the max (stabiliser) and the spread (path choice). Scalars only: a global
    # factor cancels in the first prototype normalisation, so no per-prototype pass over the matrix is needed.
    extrema = torch.stack([scores.max(), -scores.min()])
    if reduce is not None:
        reduce(extrema, "max")
    known_safe = max_spread is not None and max_spread / eps <= LOG_DOMAIN_SPREAD
    spread = max_spread / eps if known_safe else float(extrema.sum()) / eps  # type: ignore[operator]
    # (scores - max) / eps in fresh memory: every entry <= 0, the global maximum is 0
    logits = scores.sub(extrema[0]).mul_(1.0 / eps)
    n_protos = logits.shape[1]
    if spread <= LOG_DOMAIN_SPREAD:
        return _sinkhorn_exp(logits, n_iters, n_protos, reduce)
    return _sinkhorn_log(logits, n_iters, n_protos, reduce)


def _sinkhorn_exp(logits: Tensor, n_iters: int, n_protos: int, reduce: Reduce | None) -> Tensor:
    """The authors' multiplicative iterations, (B, K) layout. The total-mass normalisation of their code is
    skipped: the first prototype normalisation cancels any global factor."""
    codes = logits.exp_()
    for _ in range(n_iters):
        col_sum = codes.sum(dim=0, keepdim=True)  # (1, K): each prototype's mass over all samples
        if reduce is not None:
            reduce(col_sum, "sum")
        codes *= (col_sum * n_protos).reciprocal_()  # every prototype gets 1/K of the mass
        codes *= codes.sum(dim=1, keepdim=True).reciprocal_()  # every sample a unit mass (rows are local)
    return codes


def _sinkhorn_log(logits: Tensor, n_iters: int, n_protos: int, reduce: Reduce | None) -> Tensor:
    """The same iterations on log-codes, for spreads where exp would underflow."""
    log_codes = logits
    for _ in range(n_iters):
        log_codes = log_codes - (_global_logsumexp_over_samples(log_codes, reduce) + math.log(n_protos))
        log_codes = log_codes - torch.logsumexp(log_codes, dim=1, keepdim=True)
    return log_codes.exp()


def _global_logsumexp_over_samples(log_codes: Tensor, reduce: Reduce | None) -> Tensor:
    """(1, K) logsumexp over the samples of every process."""
    col_max = log_codes.max(dim=0, keepdim=True).values  # (1, K)
    if reduce is not None:
        reduce(col_max, "max")
    col_max = torch.where(torch.isfinite(col_max), col_max, torch.zeros_like(col_max))
    col_sum = (log_codes - col_max).exp().sum(dim=0, keepdim=True)  # (1, K)
    if reduce is not None:
        reduce(col_sum, "sum")
    return col_sum.log() + col_max
