"""Sinkhorn-Knopp: marginals, agreement with a float64 textbook version, numerics, and the distributed reduce."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from streamssl.learner.methods.sinkhorn import LOG_DOMAIN_SPREAD, sinkhorn, torch_distributed_reduce


def cosine_scores(n: int, k: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.T


def textbook(scores: torch.Tensor, n_iters: int, eps: float) -> torch.Tensor:
    """The SwAV authors' algorithm, float64, no stabilisation: Q is (K, B)."""
    q = torch.exp(scores.double() / eps).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).T


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 64), k=st.integers(2, 50), eps=st.sampled_from([0.01, 0.05, 0.5]),
       n_iters=st.integers(1, 5), seed=st.integers(0, 1000))
def test_rows_sum_to_one(b: int, k: int, eps: float, n_iters: int, seed: int) -> None:
    codes = sinkhorn(cosine_scores(b, k, seed=seed), n_iters=n_iters, eps=eps)
    assert codes.shape == (b, k) and codes.dtype == torch.float32
    assert torch.isfinite(codes).all() and (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(b), atol=1e-5, rtol=0)


def test_column_sums_approach_equipartition() -> None:
    b, k = 256, 32
    scores = cosine_scores(b, k)
    deviation = []
    for n_iters in (1, 3, 10, 100):
        cols = sinkhorn(scores, n_iters=n_iters, eps=0.05).sum(dim=0)
        deviation.append(float((cols - b / k).abs().max()))
    assert deviation == sorted(deviation, reverse=True)
    assert deviation[-1] < 1e-3 * b / k < deviation[0]


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.02])  # 0.02 on cosine scores takes the log-domain path
def test_agrees_with_float64_textbook(eps: float) -> None:
    scores = cosine_scores(300, 40, seed=3)
    for n_iters in (1, 3, 7):
        torch.testing.assert_close(sinkhorn(scores, n_iters=n_iters, eps=eps),
                                   textbook(scores, n_iters, eps).float(), atol=1e-5, rtol=0)


def test_both_paths_taken_and_agree() -> None:
    scores = cosine_scores(128, 16, seed=5)
    spread = float(scores.max() - scores.min())
    eps_exp, eps_log = spread / (LOG_DOMAIN_SPREAD / 2), spread / (LOG_DOMAIN_SPREAD * 1.5)
    for eps in (eps_exp, eps_log):
        torch.testing.assert_close(sinkhorn(scores, eps=eps), textbook(scores, 3, eps).float(), atol=1e-5, rtol=0)


def test_a_known_spread_skips_the_readback_and_keeps_the_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the caller's bound on the spread (cosines: 2) the path is chosen without reading the scores'
    range back (a wait for a GPU); a bound that would not keep the multiplicative path safe is not used."""
    scores = cosine_scores(200, 30, seed=4)
    expected = {eps: sinkhorn(scores, eps=eps) for eps in (0.05, 0.02)}
    reads: list[int] = []
    real_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(1) or real_float(t))
    torch.testing.assert_close(sinkhorn(scores, eps=0.05, max_spread=2.0), expected[0.05], atol=0, rtol=0)
    assert reads == []
    # 2 / 0.02 = 100 > LOG_DOMAIN_SPREAD: the bound is too loose to trust, the range is measured
    torch.testing.assert_close(sinkhorn(scores, eps=0.02, max_spread=2.0), expected[0.02], atol=0, rtol=0)
    assert reads == [1]


@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_no_nan_on_unnormalised_scores_and_small_eps(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(512, 300, generator=g) * scale
    codes = sinkhorn(scores, eps=0.01)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(512), atol=1e-5, rtol=0)


def test_float32_under_autocast() -> None:
    scores = cosine_scores(64, 10).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sinkhorn(scores)
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes, sinkhorn(scores.float()), atol=1e-5, rtol=0)


def test_codes_carry_no_gradient() -> None:
    scores = cosine_scores(8, 4).requires_grad_()
    assert not sinkhorn(scores).requires_grad


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, eps: float, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        scores = cosine_scores(96, 24, seed=11)
        half = scores.chunk(world)[rank]
        # as a numpy array, pickled by value: a tensor would travel as a shared-memory handle that the parent
        # fetches from this process's socket, gone if this process has exited first (seen as a flaky failure)
        queue.put((rank, sinkhorn(half, eps=eps, reduce=torch_distributed_reduce).numpy()))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("eps", [0.05, 0.02])  # both the exp and the log-domain path
def test_reduced_halves_equal_whole_batch(eps: float) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, eps, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {rank: torch.from_numpy(codes) for rank, codes in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    whole = sinkhorn(cosine_scores(96, 24, seed=11), eps=eps)
    torch.testing.assert_close(torch.cat([results[0], results[1]]), whole, atol=1e-6, rtol=0)
    # and the halves alone would not give it: the reduce matters
    alone = torch.cat([sinkhorn(h, eps=eps) for h in cosine_scores(96, 24, seed=11).chunk(2)])
    assert (alone - whole).abs().max() > 1e-4
